// Sequence::Impl: prefill and the decode step in its parts (client/sequence_impl.h).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/sequence_impl.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "icecache/attachment.h"
#include "selection/budget.h"

namespace icecache {

using client_internal::Buffer;
using client_internal::DecodePlan;
using client_internal::Marker;
using client_internal::PendingOp;

namespace {

constexpr uint32_t kMaxSplits = 64;

double MicrosSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t).count();
}

uint32_t ChunksFor(uint64_t rows) {
  return static_cast<uint32_t>((rows + DecodePlan::kChunkRows - 1) / DecodePlan::kChunkRows);
}

selection::BudgetSplit SplitOf(const ResolvedGeometry& g) {
  return selection::BudgetSplit{g.budget_tokens, g.sink_tokens, g.window_tokens, g.page_size};
}

}  // namespace

const char* SelectionModeName(SelectionMode mode) {
  return mode == SelectionMode::kAsync ? "async" : "sync";
}

// The public geometry's share of the budget split (selection/budget.h owns the formula).
uint32_t ResolvedGeometry::selected_pages() const { return SplitOf(*this).selected_pages(); }

Sequence::Impl::Impl(client_internal::SequenceContext context)
    : ctx_(std::move(context)), be_(ctx_.backend), tr_(ctx_.transport) {}

Sequence::Impl::~Impl() {
  if (!dropped_) (void)Drop();
}

absl::Status Sequence::Impl::Init() {
  const ResolvedGeometry& g = ctx_.geometry;
  ICECACHE_RETURN_IF_ERROR(selection::ValidateSplit(SplitOf(g)));
  if (!(ctx_.cache_factor >= 1.0) || ctx_.cache_factor > 64.0) {
    return absl::InvalidArgumentError("cache_factor must be within [1, 64]");
  }
  if (!(ctx_.scale >= 0) || !std::isfinite(ctx_.scale)) {
    return absl::InvalidArgumentError("scale must be finite and >= 0");
  }
  if (!(ctx_.drift_threshold >= -1.0f && ctx_.drift_threshold <= 1.0f)) {
    return absl::InvalidArgumentError("drift_threshold must be within [-1, 1]");
  }
  layout_ = PageLayout{g.page_size, g.head_dim, DTypeBytes(g.dtype)};
  row_bytes_ = layout_.row_bytes();
  if (ctx_.scale == 0) ctx_.scale = 1.0f / std::sqrt(static_cast<float>(g.head_dim));
  k_sel_ = g.selected_pages();
  cache_slots_ =
      std::max<uint32_t>(k_sel_, static_cast<uint32_t>(std::ceil(ctx_.cache_factor * k_sel_)));
  const selection::WindowPolicy probe(SplitOf(g));
  offloaded_chunks_ = ChunksFor(g.sink_tokens) + ChunksFor(probe.ring_capacity()) + 1 + k_sel_;
  full_chunks_ = g.full_kv_layers > 0 ? ChunksFor(g.max_tokens) : 0;
  layers_.resize(g.num_layers);
  for (uint32_t l = 0; l < g.num_layers; ++l) layers_[l].full_kv = l < g.full_kv_layers;
  q_float_.resize(size_t{g.num_q_heads} * g.head_dim);
  return q_host_.Allocate(be_, size_t{g.num_q_heads} * row_bytes_, /*on_host=*/true);
}

absl::Status Sequence::Impl::CheckUsable(uint32_t layer) const {
  if (dropped_) return absl::FailedPreconditionError("the sequence was dropped");
  if (layer >= ctx_.geometry.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layer ", layer, " out of range (the sequence has ", ctx_.geometry.num_layers, ")"));
  }
  if (!layers_[layer].failed.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("layer ", layer, " failed earlier: ", layers_[layer].failed.message()));
  }
  return absl::OkStatus();
}

absl::Status Sequence::Impl::AllocateKv(Buffer* buffer, size_t bytes) {
  ICECACHE_RETURN_IF_ERROR(buffer->Allocate(be_, bytes));
  kv_device_bytes_ += bytes;
  return absl::OkStatus();
}

absl::Status Sequence::Impl::AllocateLayer(uint32_t layer) {
  const ResolvedGeometry& g = ctx_.geometry;
  LayerState& L = layers_[layer];
  const size_t kv = g.num_kv_heads;
  if (L.full_kv) {
    ICECACHE_RETURN_IF_ERROR(AllocateKv(&L.full_k, kv * g.max_tokens * row_bytes_));
    ICECACHE_RETURN_IF_ERROR(AllocateKv(&L.full_v, kv * g.max_tokens * row_bytes_));
    L.plan = std::make_unique<DecodePlan>(g.num_kv_heads, 0, full_chunks_);
  } else {
    L.window = std::make_unique<selection::WindowPolicy>(SplitOf(g));
    if (g.sink_tokens > 0) {
      ICECACHE_RETURN_IF_ERROR(AllocateKv(&L.sink_k, kv * g.sink_tokens * row_bytes_));
      ICECACHE_RETURN_IF_ERROR(AllocateKv(&L.sink_v, kv * g.sink_tokens * row_bytes_));
    }
    const uint32_t ring = L.window->ring_capacity();
    ICECACHE_RETURN_IF_ERROR(AllocateKv(&L.ring_k, kv * ring * row_bytes_));
    ICECACHE_RETURN_IF_ERROR(AllocateKv(&L.ring_v, kv * ring * row_bytes_));
    ICECACHE_RETURN_IF_ERROR(AllocateKv(&L.cache_memory, kv * cache_slots_ * layout_.page_bytes()));
    L.cache = std::make_unique<client_internal::PageCache>(g.num_kv_heads, cache_slots_);
    L.plan =
        std::make_unique<DecodePlan>(g.num_kv_heads, g.num_kv_heads * k_sel_, offloaded_chunks_);
  }
  ICECACHE_RETURN_IF_ERROR(L.desc_host.Allocate(be_, L.plan->buffer_bytes(), /*on_host=*/true));
  ICECACHE_RETURN_IF_ERROR(L.desc_dev.Allocate(be_, L.plan->buffer_bytes()));
  DecodeAttentionParams probe;
  probe.num_q_heads = g.num_q_heads;
  probe.num_kv_heads = g.num_kv_heads;
  probe.head_dim = g.head_dim;
  const size_t scratch = be_->AttentionScratchBytes(probe, kMaxSplits);
  if (scratch > 0) ICECACHE_RETURN_IF_ERROR(L.scratch.Allocate(be_, scratch));
  for (std::unique_ptr<Marker>* m : {&L.done, &L.fetch_begin, &L.fetch_end}) {
    ICECACHE_ASSIGN_OR_RETURN(*m, be_->CreateMarker());
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Daemon operations

absl::Status Sequence::Impl::FinishPending(uint32_t layer) {
  LayerState& L = layers_[layer];
  if (!L.pending) return absl::OkStatus();
  const PendingOp op = *L.pending;
  L.pending.reset();
  pending_order_.erase(std::find(pending_order_.begin(), pending_order_.end(), layer));
  absl::Status st = tr_->Finish(op.ticket);
  if (!st.ok()) {
    // The daemon consumes staging only on success; hand it back (best effort).
    (void)tr_->ReleaseStaging(ctx_.handle, op.staging);
    L.failed = st;
    return absl::Status(st.code(), absl::StrCat("layer ", layer, ": ", st.message()));
  }
  L.daemon_built = true;
  if (op.from_window) ICECACHE_RETURN_IF_ERROR(L.window->Retire());
  return absl::OkStatus();
}

// Runs `f` (which takes a request slot); when every slot is taken by pending operations,
// finishes the oldest and tries again.
template <typename F>
auto Sequence::Impl::WithSlot(F f) -> decltype(f()) {
  while (true) {
    auto r = f();
    if (r.ok() || !IsSlotsExhausted(r.status()) || pending_order_.empty()) return r;
    ICECACHE_RETURN_IF_ERROR(FinishPending(pending_order_.front()));
  }
}

absl::Status Sequence::Impl::Submit(uint32_t layer, uint32_t op, const abi::ArenaRef& staging,
                                    uint32_t tokens, uint32_t first_position, bool from_window) {
  absl::StatusOr<client_internal::Ticket> ticket = WithSlot(
      [&] { return tr_->SubmitStaged(op, ctx_.handle, layer, staging, tokens, first_position); });
  if (!ticket.ok()) {
    (void)tr_->ReleaseStaging(ctx_.handle, staging);
    return ticket.status();
  }
  layers_[layer].pending =
      PendingOp{.ticket = *ticket, .op = op, .staging = staging, .from_window = from_window};
  pending_order_.push_back(layer);
  return absl::OkStatus();
}

absl::StatusOr<abi::StageResponse> Sequence::Impl::Stage(uint32_t tokens) {
  return WithSlot([&] { return tr_->Stage(ctx_.handle, tokens); });
}

// ---------------------------------------------------------------------------------------------
// Prefill

absl::Status Sequence::Impl::Prefill(uint32_t layer, const void* k, const void* v, uint32_t n,
                                     void* stream) {
  ICECACHE_RETURN_IF_ERROR(CheckUsable(layer));
  const ResolvedGeometry& g = ctx_.geometry;
  LayerState& L = layers_[layer];
  if (L.prefilled) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " was prefilled already"));
  }
  if (k == nullptr || v == nullptr) return absl::InvalidArgumentError("k and v must not be null");
  if (n == 0) return absl::InvalidArgumentError("tokens must be > 0");
  if (n > g.max_tokens) {
    return absl::ResourceExhaustedError(
        absl::StrCat(n, " prompt tokens exceed the sequence's max_tokens ", g.max_tokens));
  }
  if (prompt_tokens_ && *prompt_tokens_ != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("every layer's prompt has the same length: earlier layers had ",
                     *prompt_tokens_, " tokens, layer ", layer, " has ", n));
  }
  ICECACHE_RETURN_IF_ERROR(AllocateLayer(layer));
  const uint32_t kv = g.num_kv_heads;
  const uint32_t rb = static_cast<uint32_t>(row_bytes_);
  // Prompt rows [begin, begin + count) to head-major rows of dst, `head_rows` rows per head.
  auto write = [&](void* k_dst, void* v_dst, uint64_t begin, uint64_t count, uint64_t head_rows,
                   uint32_t dst_row = 0) {
    return be_->WriteStaging(WriteStagingParams{.k_src = k,
                                                .v_src = v,
                                                .k_dst = k_dst,
                                                .v_dst = v_dst,
                                                .token_begin = static_cast<uint32_t>(begin),
                                                .count = static_cast<uint32_t>(count),
                                                .kv_heads = kv,
                                                .row_bytes = rb,
                                                .dst_head_stride = head_rows * row_bytes_,
                                                .dst_row_begin = dst_row},
                             stream);
  };
  if (L.full_kv) {
    ICECACHE_RETURN_IF_ERROR(write(L.full_k.ptr(), L.full_v.ptr(), 0, n, g.max_tokens));
  } else {
    ICECACHE_ASSIGN_OR_RETURN(const selection::WindowPolicy::PromptPlan plan, L.window->Prefill(n));
    if (plan.sink_tokens > 0) {
      ICECACHE_RETURN_IF_ERROR(
          write(L.sink_k.ptr(), L.sink_v.ptr(), 0, plan.sink_tokens, g.sink_tokens));
    }
    if (n > plan.window_begin) {
      ICECACHE_RETURN_IF_ERROR(write(L.ring_k.ptr(), L.ring_v.ptr(), plan.window_begin,
                                     n - plan.window_begin, L.window->ring_capacity(),
                                     static_cast<uint32_t>(L.window->RingRow(plan.window_begin))));
    }
    if (plan.index_tokens > 0) {
      const uint32_t count = static_cast<uint32_t>(plan.index_tokens);
      ICECACHE_ASSIGN_OR_RETURN(const abi::StageResponse staged, Stage(count));
      absl::StatusOr<client_internal::ArenaSpan> dst = tr_->Map(staged.buffer, staged.bytes);
      absl::Status st = dst.status();
      if (st.ok()) {
        // The staging layout: [kv][count][row] K, then V at v_offset.
        st = write(dst->device, dst->device + staged.v_offset, plan.index_begin, count, count);
      }
      // The daemon reads the staging buffer as soon as the prefill is submitted.
      if (st.ok()) st = be_->Synchronize(stream);
      if (!st.ok()) {
        (void)tr_->ReleaseStaging(ctx_.handle, staged.buffer);
        return st;
      }
      ICECACHE_RETURN_IF_ERROR(Submit(layer, abi::kOpPrefill, staged.buffer, count,
                                      static_cast<uint32_t>(plan.index_begin),
                                      /*from_window=*/false));
    }
  }
  L.tokens = n;
  L.prefilled = true;
  prompt_tokens_ = n;
  ++prefilled_layers_;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Decode

absl::Status Sequence::Impl::StartStep(LayerState& L) {
  // The previous step's work on this layer's descriptors and cache must be done before they
  // are rewritten; its fetch time is known then.
  if (L.done_recorded) ICECACHE_RETURN_IF_ERROR(be_->WaitMarker(L.done.get()));
  if (L.fetch_pending_timing) {
    absl::StatusOr<double> us = be_->ElapsedUs(L.fetch_begin.get(), L.fetch_end.get());
    if (us.ok()) tr_->stats().fetch_nanoseconds.fetch_add(static_cast<uint64_t>(*us * 1000.0));
    L.fetch_pending_timing = false;
  }
  return absl::OkStatus();
}

absl::Status Sequence::Impl::RetireHandOver(uint32_t layer, DecodeBreakdown* b) {
  if (!layers_[layer].pending) return absl::OkStatus();
  const auto t = std::chrono::steady_clock::now();
  ICECACHE_RETURN_IF_ERROR(FinishPending(layer));
  b->wait_us += MicrosSince(t);
  return absl::OkStatus();
}

absl::StatusOr<std::optional<uint64_t>> Sequence::Impl::AppendToken(LayerState& L,
                                                                    const void* k_new,
                                                                    const void* v_new,
                                                                    void* stream) {
  const ResolvedGeometry& g = ctx_.geometry;
  selection::WindowPolicy& w = *L.window;
  if (!w.CanAppend()) return absl::InternalError("the window ring is full");
  const uint64_t pos = w.tokens();
  const bool sink = w.NextInSink();
  const uint32_t rows = sink ? g.sink_tokens : w.ring_capacity();
  ICECACHE_RETURN_IF_ERROR(
      be_->AppendKv(AppendKvParams{.k_new = k_new,
                                   .v_new = v_new,
                                   .k_dst = sink ? L.sink_k.ptr() : L.ring_k.ptr(),
                                   .v_dst = sink ? L.sink_v.ptr() : L.ring_v.ptr(),
                                   .head_stride = uint64_t{rows} * row_bytes_,
                                   .slot = static_cast<uint32_t>(sink ? pos : w.RingRow(pos)),
                                   .kv_heads = g.num_kv_heads,
                                   .row_bytes = static_cast<uint32_t>(row_bytes_)},
                    stream));
  return w.Append();
}

absl::StatusOr<std::vector<abi::SelectedPageRef>> Sequence::Impl::SearchNow(uint32_t layer,
                                                                            const uint8_t* mask,
                                                                            DecodeBreakdown* b) {
  const ResolvedGeometry& g = ctx_.geometry;
  const size_t q_elems = size_t{g.num_q_heads} * g.head_dim;
  const auto ts = std::chrono::steady_clock::now();
  absl::StatusOr<client_internal::Ticket> ticket = WithSlot([&] {
    return tr_->SubmitSelect(ctx_.handle, layer, q_float_.data(), q_elems, k_sel_, mask,
                             g.num_kv_heads);
  });
  if (!ticket.ok()) return ticket.status();
  ICECACHE_ASSIGN_OR_RETURN(std::vector<abi::SelectedPageRef> refs, tr_->FinishSelect(*ticket));
  const double us = MicrosSince(ts);
  b->select_us += us;
  b->select_wait_us += us;
  if (refs.size() != size_t{g.num_kv_heads} * k_sel_) {
    return absl::InternalError(absl::StrCat("the daemon returned ", refs.size(),
                                            " page references, expected ",
                                            g.num_kv_heads * k_sel_));
  }
  return refs;
}

absl::StatusOr<std::vector<abi::SelectedPageRef>> Sequence::Impl::SelectPages(uint32_t layer,
                                                                              const void* q,
                                                                              void* stream,
                                                                              DecodeBreakdown* b) {
  const ResolvedGeometry& g = ctx_.geometry;
  LayerState& L = layers_[layer];
  const size_t q_elems = size_t{g.num_q_heads} * g.head_dim;
  // The query must reach the host: the daemon searches with it, the drift check reads it.
  ICECACHE_RETURN_IF_ERROR(be_->Copy(q_host_.ptr(), q, q_elems * 2, stream));
  ICECACHE_RETURN_IF_ERROR(be_->Synchronize(stream));
  const uint16_t* qh = static_cast<const uint16_t*>(q_host_.ptr());
  for (size_t i = 0; i < q_elems; ++i) {
    q_float_[i] = g.dtype == DType::kBF16 ? Bf16ToFloat(qh[i]) : HalfToFloat(qh[i]);
  }
  if (!L.prefetch) return SearchNow(layer, nullptr, b);

  // One step ahead: the pages searched with the previous query, and a synchronous search of
  // the heads whose query moved too far since.
  client_internal::Prefetch prefetch = std::move(*L.prefetch);
  L.prefetch.reset();
  const auto tw = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<abi::SelectedPageRef>> refs = tr_->FinishSelect(prefetch.ticket);
  b->select_wait_us += MicrosSince(tw);
  if (!refs.ok()) return refs.status();
  if (refs->size() != size_t{g.num_kv_heads} * k_sel_) {
    return absl::InternalError(absl::StrCat("the daemon returned ", refs->size(),
                                            " page references, expected ",
                                            g.num_kv_heads * k_sel_));
  }
  b->prefetched = true;
  const uint32_t group = g.num_q_heads / g.num_kv_heads, d = g.head_dim;
  std::vector<uint8_t> drifted(g.num_kv_heads, 0);
  uint32_t fallbacks = 0;
  for (uint32_t h = 0; h < g.num_kv_heads; ++h) {
    for (uint32_t j = 0; j < group && drifted[h] == 0; ++j) {
      const float* a = prefetch.query.data() + (size_t{h} * group + j) * d;
      const float* c = q_float_.data() + (size_t{h} * group + j) * d;
      double dot = 0, na = 0, nc = 0;
      for (uint32_t i = 0; i < d; ++i) {
        dot += double{a[i]} * c[i];
        na += double{a[i]} * a[i];
        nc += double{c[i]} * c[i];
      }
      const double cosine = na > 0 && nc > 0 ? dot / std::sqrt(na * nc) : -1.0;
      if (!(cosine >= ctx_.drift_threshold)) drifted[h] = 1;
    }
    fallbacks += drifted[h];
  }
  b->drift_fallback_heads = fallbacks;
  tr_->stats().prefetched_selects.fetch_add(1);
  if (fallbacks == 0) return refs;
  tr_->stats().drift_fallback_heads.fetch_add(fallbacks);
  ICECACHE_ASSIGN_OR_RETURN(std::vector<abi::SelectedPageRef> fresh,
                            SearchNow(layer, drifted.data(), b));
  for (uint32_t h = 0; h < g.num_kv_heads; ++h) {
    if (drifted[h] == 0) continue;
    std::copy_n(fresh.begin() + size_t{h} * k_sel_, k_sel_, refs->begin() + size_t{h} * k_sel_);
  }
  return refs;
}

absl::Status Sequence::Impl::CollectMailbox(uint32_t layer) {
  LayerState& L = layers_[layer];
  std::optional<client_internal::Ticket> append, select;
  absl::Status append_error;
  {
    absl::MutexLock lock(&L.mailbox->mu);
    append = std::exchange(L.mailbox->append, std::nullopt);
    select = std::exchange(L.mailbox->select, std::nullopt);
    append_error = std::exchange(L.mailbox->append_error, absl::OkStatus());
  }
  if (select) {
    L.prefetch = client_internal::Prefetch{.ticket = *select, .query = std::move(L.next_query)};
  }
  if (!L.staged) return absl::OkStatus();
  const client_internal::StagedHandOver staged = *L.staged;
  L.staged.reset();
  const uint32_t op = L.daemon_built ? abi::kOpAppend : abi::kOpPrefill;
  if (append) {
    L.pending = PendingOp{
        .ticket = *append, .op = op, .staging = staged.staged.buffer, .from_window = true};
    pending_order_.push_back(layer);
    return absl::OkStatus();
  }
  // The callback could not submit the hand-over (e.g. every slot was in use): submit it now
  // (no select was sent after it, so no prefetched page can be changed by it).
  (void)append_error;
  return Submit(layer, op, staged.staged.buffer, ctx_.geometry.page_size,
                static_cast<uint32_t>(staged.first), /*from_window=*/true);
}

absl::Status Sequence::Impl::EndStepAsync(uint32_t layer, std::optional<uint64_t> hand_over,
                                          void* stream) {
  const ResolvedGeometry& g = ctx_.geometry;
  LayerState& L = layers_[layer];
  const uint32_t P = g.page_size;
  if (hand_over) {
    // Staged and copied now (stream-ordered after this step's attention); submitted by the
    // callback once the stream got there, so the step's gather is done with the layer's frames
    // before an insert may change them.
    ICECACHE_ASSIGN_OR_RETURN(const abi::StageResponse staged, Stage(P));
    absl::StatusOr<client_internal::ArenaSpan> dst = tr_->Map(staged.buffer, staged.bytes);
    absl::Status st = dst.status();
    const uint64_t ring = L.window->ring_capacity();
    const uint64_t row0 = L.window->RingRow(*hand_over);
    if (st.ok()) {
      st = be_->Copy2D(dst->device, P * row_bytes_, L.ring_k.bytes() + row0 * row_bytes_,
                       ring * row_bytes_, P * row_bytes_, g.num_kv_heads, stream);
    }
    if (st.ok()) {
      st = be_->Copy2D(dst->device + staged.v_offset, P * row_bytes_,
                       L.ring_v.bytes() + row0 * row_bytes_, ring * row_bytes_, P * row_bytes_,
                       g.num_kv_heads, stream);
    }
    if (!st.ok()) {
      (void)tr_->ReleaseStaging(ctx_.handle, staged.buffer);
      return st;
    }
    L.staged = client_internal::StagedHandOver{.staged = staged, .first = *hand_over};
  }
  const bool send_select = L.daemon_built;
  if (send_select) L.next_query = q_float_;
  if (!L.staged && !send_select) return absl::OkStatus();

  client_internal::Transport* tr = tr_;
  client_internal::Mailbox* box = L.mailbox.get();
  const std::string handle = ctx_.handle;
  std::optional<client_internal::StagedHandOver> staged = L.staged;
  const uint32_t op = L.daemon_built ? abi::kOpAppend : abi::kOpPrefill;
  const float* query = L.next_query.data();
  const size_t query_floats = L.next_query.size();
  const uint32_t k = k_sel_;
  ICECACHE_RETURN_IF_ERROR(be_->HostCallback(stream, [=] {
    if (staged) {
      absl::StatusOr<client_internal::Ticket> t = tr->SubmitStaged(
          op, handle, layer, staged->staged.buffer, P, static_cast<uint32_t>(staged->first));
      absl::MutexLock lock(&box->mu);
      if (t.ok()) {
        box->append = *t;
      } else {
        box->append_error = t.status();
        return;  // no select may run ahead of a hand-over that is not submitted
      }
    }
    if (!send_select) return;
    absl::StatusOr<client_internal::Ticket> t =
        tr->SubmitSelect(handle, layer, query, query_floats, k);
    if (t.ok()) {
      absl::MutexLock lock(&box->mu);
      box->select = *t;
    }
  }));
  // The layer's next step starts after the callback has run.
  return be_->Record(L.done.get(), stream);
}

absl::Status Sequence::Impl::PlanFull(LayerState& L, uint64_t pos) {
  const ResolvedGeometry& g = ctx_.geometry;
  DecodePlan& plan = *L.plan;
  for (uint32_t h = 0; h < g.num_kv_heads; ++h) {
    plan.BeginHead();
    const uint64_t head = uint64_t{h} * g.max_tokens * row_bytes_;
    plan.AddRows(L.full_k.bytes() + head, L.full_v.bytes() + head, row_bytes_, 0, pos + 1);
  }
  return plan.Finish();
}

absl::Status Sequence::Impl::PlanOffloaded(LayerState& L,
                                           const std::vector<abi::SelectedPageRef>& refs,
                                           uint64_t pos, DecodeBreakdown* b) {
  const ResolvedGeometry& g = ctx_.geometry;
  const selection::WindowPolicy& w = *L.window;
  DecodePlan& plan = *L.plan;
  const uint64_t step = ++L.steps;
  const uint64_t page_bytes = layout_.page_bytes();
  const uint64_t in_sink = std::min<uint64_t>(pos + 1, g.sink_tokens);
  const uint64_t window_rows = pos + 1 > w.window_begin() ? pos + 1 - w.window_begin() : 0;
  const uint64_t row0 = w.RingRow(w.window_begin());
  const uint64_t ring = w.ring_capacity();
  for (uint32_t h = 0; h < g.num_kv_heads; ++h) {
    plan.BeginHead();
    if (in_sink > 0) {
      const uint64_t head = uint64_t{h} * g.sink_tokens * row_bytes_;
      plan.AddRows(L.sink_k.bytes() + head, L.sink_v.bytes() + head, row_bytes_, 0, in_sink);
    }
    if (window_rows > 0) {
      const uint64_t head = uint64_t{h} * ring * row_bytes_;
      const uint64_t first = std::min(window_rows, ring - row0);
      plan.AddRows(L.ring_k.bytes() + head, L.ring_v.bytes() + head, row_bytes_, row0, first);
      plan.AddRows(L.ring_k.bytes() + head, L.ring_v.bytes() + head, row_bytes_, 0,
                   window_rows - first);
    }
    for (uint32_t j = 0; j < k_sel_ && !refs.empty(); ++j) {
      const abi::SelectedPageRef& r = refs[size_t{h} * k_sel_ + j];
      if (r.segment == abi::kNoSegment || r.valid == 0) continue;
      if (r.valid > g.page_size) return absl::InternalError("a page's valid count is too big");
      if (tr_->PageBytes(r.segment) != page_bytes) {
        return absl::InternalError("the daemon returned a page of another page size");
      }
      ICECACHE_ASSIGN_OR_RETURN(const client_internal::PageCache::Placement at,
                                L.cache->Place(h, r, step));
      uint8_t* slot = L.cache_memory.bytes() + (size_t{h} * cache_slots_ + at.slot) * page_bytes;
      if (at.fetch) {
        ICECACHE_ASSIGN_OR_RETURN(
            const client_internal::ArenaSpan src,
            tr_->Map(abi::ArenaRef{r.segment, 0, uint64_t{r.frame} * page_bytes}, page_bytes));
        plan.AddGather(src.device, slot);
        ++b->misses;
      } else {
        ++b->hits;
      }
      plan.AddPage(slot, layout_.half_bytes(), r.valid);
    }
  }
  b->selected_pages = b->hits + b->misses;
  return plan.Finish();
}

absl::Status Sequence::Impl::Launch(LayerState& L, const void* q, void* out, void* stream,
                                    DecodeBreakdown* b) {
  const ResolvedGeometry& g = ctx_.geometry;
  abi::ClientStats& stats = tr_->stats();
  DecodePlan& plan = *L.plan;
  size_t used = 0;
  L.plan_view = plan.Serialize(L.desc_host.bytes(), L.desc_dev.bytes(), &used);
  ICECACHE_RETURN_IF_ERROR(be_->Copy(L.desc_dev.ptr(), L.desc_host.ptr(), used, stream));

  // The gather of every missed page of the layer, one launch.
  const auto tf = std::chrono::steady_clock::now();
  if (plan.num_items() > 0) {
    ICECACHE_RETURN_IF_ERROR(be_->Record(L.fetch_begin.get(), stream));
    ICECACHE_RETURN_IF_ERROR(
        be_->Gather(L.plan_view.items, plan.num_items(), layout_.page_bytes(), stream));
    ICECACHE_RETURN_IF_ERROR(be_->Record(L.fetch_end.get(), stream));
    L.fetch_pending_timing = true;
    stats.fetched_bytes.fetch_add(plan.num_items() * layout_.page_bytes());
    if (ctx_.profile) {
      ICECACHE_ASSIGN_OR_RETURN(const double us,
                                be_->ElapsedUs(L.fetch_begin.get(), L.fetch_end.get()));
      stats.fetch_nanoseconds.fetch_add(static_cast<uint64_t>(us * 1000.0));
      L.fetch_pending_timing = false;
    }
  }
  b->fetch_us = MicrosSince(tf);

  // Attention over every head's chunks, one launch.
  const auto ta = std::chrono::steady_clock::now();
  const DecodeAttentionParams p{.q = q,
                                .out = out,
                                .chunks = L.plan_view.chunks,
                                .chunk_offsets = L.plan_view.chunk_offsets,
                                .num_q_heads = g.num_q_heads,
                                .num_kv_heads = g.num_kv_heads,
                                .head_dim = g.head_dim,
                                .dtype = g.dtype,
                                .scale = ctx_.scale};
  const uint32_t splits = std::clamp<uint32_t>(plan.max_chunks_in_a_head(), 1, kMaxSplits);
  ICECACHE_RETURN_IF_ERROR(be_->Attention(p, splits, L.scratch.ptr(), stream));
  ICECACHE_RETURN_IF_ERROR(be_->Record(L.done.get(), stream));
  L.done_recorded = true;
  if (ctx_.profile) ICECACHE_RETURN_IF_ERROR(be_->WaitMarker(L.done.get()));
  b->attention_us = MicrosSince(ta);
  b->attended_tokens = static_cast<uint32_t>(plan.attended_rows());
  return absl::OkStatus();
}

absl::Status Sequence::Impl::HandOver(uint32_t layer, uint64_t first, void* stream) {
  const ResolvedGeometry& g = ctx_.geometry;
  LayerState& L = layers_[layer];
  const uint32_t P = g.page_size;
  const uint64_t ring = L.window->ring_capacity();
  ICECACHE_ASSIGN_OR_RETURN(const abi::StageResponse staged, Stage(P));
  absl::StatusOr<client_internal::ArenaSpan> dst = tr_->Map(staged.buffer, staged.bytes);
  absl::Status st = dst.status();
  const uint64_t row0 = L.window->RingRow(first);
  if (st.ok()) {
    st = be_->Copy2D(dst->device, P * row_bytes_, L.ring_k.bytes() + row0 * row_bytes_,
                     ring * row_bytes_, P * row_bytes_, g.num_kv_heads, stream);
  }
  if (st.ok()) {
    st = be_->Copy2D(dst->device + staged.v_offset, P * row_bytes_,
                     L.ring_v.bytes() + row0 * row_bytes_, ring * row_bytes_, P * row_bytes_,
                     g.num_kv_heads, stream);
  }
  // The copies must land before the daemon reads them, and this step's gather must be done
  // with the layer's frames before an insert may rewrite them.
  if (st.ok()) st = be_->Synchronize(stream);
  if (!st.ok()) {
    (void)tr_->ReleaseStaging(ctx_.handle, staged.buffer);
    return st;
  }
  return Submit(layer, L.daemon_built ? abi::kOpAppend : abi::kOpPrefill, staged.buffer, P,
                static_cast<uint32_t>(first), /*from_window=*/true);
}

absl::Status Sequence::Impl::Decode(uint32_t layer, const void* q, const void* k_new,
                                    const void* v_new, void* out, void* stream) {
  const auto t0 = std::chrono::steady_clock::now();
  ICECACHE_RETURN_IF_ERROR(CheckUsable(layer));
  const ResolvedGeometry& g = ctx_.geometry;
  if (q == nullptr || k_new == nullptr || v_new == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("q, k_new, v_new and out must not be null");
  }
  if (prefilled_layers_ != g.num_layers) {
    return absl::FailedPreconditionError(
        absl::StrCat("every layer must be prefilled before decoding (", prefilled_layers_, " of ",
                     g.num_layers, " are)"));
  }
  LayerState& L = layers_[layer];
  uint64_t min_tokens = std::numeric_limits<uint64_t>::max();
  for (const LayerState& other : layers_) min_tokens = std::min(min_tokens, other.tokens);
  if (L.tokens != min_tokens) {
    return absl::FailedPreconditionError(absl::StrCat(
        "layer ", layer, " is a step ahead: decode every layer of a step before the next step"));
  }
  if (L.tokens >= g.max_tokens) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the sequence reached its max_tokens ", g.max_tokens));
  }
  DecodeBreakdown b;
  b.layer = layer;
  b.full_kv = L.full_kv;
  const uint64_t pos = L.tokens;
  ICECACHE_RETURN_IF_ERROR(StartStep(L));
  L.plan->Clear();
  std::optional<uint64_t> hand_over;
  if (L.full_kv) {
    ICECACHE_RETURN_IF_ERROR(
        be_->AppendKv(AppendKvParams{.k_new = k_new,
                                     .v_new = v_new,
                                     .k_dst = L.full_k.ptr(),
                                     .v_dst = L.full_v.ptr(),
                                     .head_stride = g.max_tokens * row_bytes_,
                                     .slot = static_cast<uint32_t>(pos),
                                     .kv_heads = g.num_kv_heads,
                                     .row_bytes = static_cast<uint32_t>(row_bytes_)},
                      stream));
    ICECACHE_RETURN_IF_ERROR(PlanFull(L, pos));
  } else {
    const bool async = ctx_.selection == SelectionMode::kAsync;
    if (async) ICECACHE_RETURN_IF_ERROR(CollectMailbox(layer));
    // The layer's index must be built before a select: wait for a pending build. A window
    // append goes on while the step's query travels (kAsync); selects run after it anyway.
    if (!async || (L.pending && L.pending->op == abi::kOpPrefill)) {
      ICECACHE_RETURN_IF_ERROR(RetireHandOver(layer, &b));
    }
    if (!L.window->CanAppend()) ICECACHE_RETURN_IF_ERROR(RetireHandOver(layer, &b));
    ICECACHE_ASSIGN_OR_RETURN(hand_over, AppendToken(L, k_new, v_new, stream));
    std::vector<abi::SelectedPageRef> refs;
    if (L.daemon_built) {
      ICECACHE_ASSIGN_OR_RETURN(refs, SelectPages(layer, q, stream, &b));
    }
    // Every select runs after the layer's appends submitted before it: the pending one is done
    // (or nearly), and its page leaves the window now, as it enters the selected pages.
    ICECACHE_RETURN_IF_ERROR(RetireHandOver(layer, &b));
    ICECACHE_RETURN_IF_ERROR(PlanOffloaded(L, refs, pos, &b));
  }
  ICECACHE_RETURN_IF_ERROR(Launch(L, q, out, stream, &b));
  abi::ClientStats& stats = tr_->stats();
  stats.cache_hits.fetch_add(b.hits);
  stats.cache_misses.fetch_add(b.misses);
  L.tokens = pos + 1;
  if (!L.full_kv && ctx_.selection == SelectionMode::kAsync) {
    absl::Status st = EndStepAsync(layer, hand_over, stream);
    if (!st.ok()) {
      L.failed = st;
      return st;
    }
  } else if (hand_over) {
    absl::Status st = HandOver(layer, *hand_over, stream);
    if (!st.ok()) {
      L.failed = st;
      return st;
    }
  }
  stats.decode_steps.fetch_add(1);
  b.total_us = MicrosSince(t0);
  last_ = b;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Drop and inspection

absl::Status Sequence::Impl::Drop() {
  if (dropped_) return absl::FailedPreconditionError("the sequence was dropped already");
  dropped_ = true;
  absl::Status first;
  // Every step's work and callbacks done, then every request still out answered.
  for (uint32_t l = 0; l < layers_.size(); ++l) {
    LayerState& L = layers_[l];
    if (L.done_recorded) (void)be_->WaitMarker(L.done.get());
    if (L.window != nullptr) {
      absl::Status st = CollectMailbox(l);
      if (first.ok() && !st.ok() && st.code() != absl::StatusCode::kUnavailable) first = st;
    }
    if (L.prefetch) {
      (void)tr_->FinishSelect(L.prefetch->ticket);
      L.prefetch.reset();
    }
  }
  while (!pending_order_.empty()) {
    absl::Status st = FinishPending(pending_order_.front());
    if (first.ok() && !st.ok() && st.code() != absl::StatusCode::kUnavailable) first = st;
  }
  layers_.clear();
  q_host_.Reset();
  absl::Status dropped = tr_->DropSequence(ctx_.handle);
  if (!dropped.ok() && first.ok()) first = dropped;
  return first;
}

absl::StatusOr<Sequence::AttendedRows> Sequence::Impl::LastAttended(uint32_t layer,
                                                                    uint32_t head) const {
  ICECACHE_RETURN_IF_ERROR(CheckUsable(layer));
  if (head >= ctx_.geometry.num_kv_heads) return absl::InvalidArgumentError("head out of range");
  const LayerState& L = layers_[layer];
  if (L.plan == nullptr) return absl::FailedPreconditionError("the layer was not decoded yet");
  const std::vector<AttentionChunk>& chunks = L.plan->chunks();
  const std::vector<uint32_t>& offsets = L.plan->offsets();
  if (offsets.size() != size_t{ctx_.geometry.num_kv_heads} + 1) {
    return absl::FailedPreconditionError("the layer was not decoded yet");
  }
  if (L.done_recorded) ICECACHE_RETURN_IF_ERROR(be_->WaitMarker(L.done.get()));
  AttendedRows rows;
  const size_t elems = ctx_.geometry.head_dim;
  for (uint32_t c = offsets[head]; c < offsets[head + 1]; ++c) {
    const AttentionChunk& ch = chunks[c];
    const size_t at = rows.k.size();
    rows.k.resize(at + size_t{ch.count} * elems);
    rows.v.resize(at + size_t{ch.count} * elems);
    ICECACHE_RETURN_IF_ERROR(be_->Copy(rows.k.data() + at, ch.k, ch.count * row_bytes_, nullptr));
    ICECACHE_RETURN_IF_ERROR(be_->Copy(rows.v.data() + at, ch.v, ch.count * row_bytes_, nullptr));
    rows.count += ch.count;
  }
  ICECACHE_RETURN_IF_ERROR(be_->Synchronize(nullptr));
  return rows;
}

// ---------------------------------------------------------------------------------------------
// Construction and the public surface

absl::StatusOr<std::unique_ptr<Sequence>> client_internal::SequenceFactory::Create(
    SequenceContext context) {
  if (context.backend == nullptr || context.transport == nullptr) {
    return absl::InvalidArgumentError("a sequence needs a backend and a transport");
  }
  auto impl = std::make_unique<Sequence::Impl>(std::move(context));
  absl::Status init = impl->Init();
  if (!init.ok()) return init;  // ~Impl drops the daemon's sequence
  return std::unique_ptr<Sequence>(new Sequence(std::move(impl)));
}

Sequence::Sequence(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Sequence::~Sequence() = default;
const std::string& Sequence::handle() const { return impl_->handle(); }
const ResolvedGeometry& Sequence::geometry() const { return impl_->geometry(); }
absl::Status Sequence::Prefill(uint32_t layer, const void* k, const void* v, uint32_t tokens,
                               void* stream) {
  return impl_->Prefill(layer, k, v, tokens, stream);
}
absl::Status Sequence::Decode(uint32_t layer, const void* q, const void* k_new, const void* v_new,
                              void* out, void* stream) {
  return impl_->Decode(layer, q, k_new, v_new, out, stream);
}
absl::Status Sequence::Drop() { return impl_->Drop(); }
uint64_t Sequence::tokens(uint32_t layer) const { return impl_->tokens(layer); }
const DecodeBreakdown& Sequence::last_decode() const { return impl_->last(); }
uint64_t Sequence::kv_device_bytes() const { return impl_->kv_device_bytes(); }
absl::StatusOr<Sequence::AttendedRows> Sequence::LastAttended(uint32_t layer, uint32_t head) const {
  return impl_->LastAttended(layer, head);
}

}  // namespace icecache
