// Sequence::Impl: prefill and the decode step in its parts (client/sequence_impl.h).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/decoder.h"
#include "client/sequence_impl.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "icecache/attachment.h"
#include "selection/budget.h"
#include "selection/tail.h"

namespace icecache {

using client_internal::Buffer;
using client_internal::DecodePlan;
using client_internal::Marker;
using client_internal::PendingOp;

namespace {

double MicrosSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t).count();
}

// The lowest cosine between two [group][dim] query groups, row by row (-1 for a zero row).
double LowestCosine(const float* a, const float* b, uint32_t group, uint32_t dim) {
  double lowest = 1.0;
  for (uint32_t j = 0; j < group; ++j) {
    double dot = 0, na = 0, nb = 0;
    for (uint32_t i = 0; i < dim; ++i) {
      const double x = a[size_t{j} * dim + i], y = b[size_t{j} * dim + i];
      dot += x * y;
      na += x * x;
      nb += y * y;
    }
    lowest = std::min(lowest, na > 0 && nb > 0 ? dot / std::sqrt(na * nb) : -1.0);
  }
  return lowest;
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

// The public enum mirrors selection::TailMode value for value; its names are the one list.
static_assert(static_cast<int>(TailEstimate::kNone) ==
                  static_cast<int>(selection::TailMode::kNone) &&
              static_cast<int>(TailEstimate::kMean) ==
                  static_cast<int>(selection::TailMode::kMean) &&
              static_cast<int>(TailEstimate::kMeanVariance) ==
                  static_cast<int>(selection::TailMode::kMeanVariance));

const char* TailEstimateName(TailEstimate estimate) {
  // TailModeName returns views of string literals: NUL-terminated.
  return selection::TailModeName(static_cast<selection::TailMode>(estimate)).data();
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
  // The attention's scale is the one the daemon resolved (the tail partials are computed in
  // its units); a daemon that reports none leaves it to the option (0: 1/sqrt(head_dim)).
  if (g.softmax_scale > 0 && std::isfinite(g.softmax_scale)) ctx_.scale = g.softmax_scale;
  if (ctx_.scale == 0) ctx_.scale = 1.0f / std::sqrt(static_cast<float>(g.head_dim));
  tail_floats_ = g.keeps_tail() ? g.num_q_heads * (2 + g.head_dim) : 0;
  k_sel_ = g.selected_pages();
  cache_slots_ =
      std::max<uint32_t>(k_sel_, static_cast<uint32_t>(std::ceil(ctx_.cache_factor * k_sel_)));
  const selection::WindowPolicy probe(SplitOf(g));
  offloaded_chunks_ = ChunksFor(g.sink_tokens) + ChunksFor(probe.ring_capacity()) + 1 + k_sel_;
  full_chunks_ = g.full_kv_layers > 0 ? ChunksFor(g.max_tokens) : 0;
  layers_.resize(g.num_layers);
  for (uint32_t l = 0; l < g.num_layers; ++l) layers_[l].full_kv = l < g.full_kv_layers;
  q_float_.resize(size_t{g.num_q_heads} * g.head_dim);
  if (ctx_.decoder == nullptr) return absl::InvalidArgumentError("a sequence needs a decoder");
  return absl::OkStatus();
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
  // A layer allocated again (a prefill retried after it failed past its allocation) lets its
  // previous buffer go: Allocate frees it first, whatever it then returns.
  kv_device_bytes_ -= buffer->size();
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
  }
  ICECACHE_ASSIGN_OR_RETURN(L.done, be_->CreateMarker());
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
// One step ahead: the shared answers of a batch select

absl::Status client_internal::PrefetchBatch::FinishLocked() {
  if (!finished_) {
    finished_ = true;
    answers_ = transport_->FinishSelectBatch(ticket_);
  }
  return answers_.status();
}

client_internal::PrefetchBatch::~PrefetchBatch() {
  absl::MutexLock lock(&mu_);
  (void)FinishLocked();
}

absl::StatusOr<client_internal::SelectAnswer> client_internal::PrefetchBatch::Get(size_t index) {
  absl::MutexLock lock(&mu_);
  ICECACHE_RETURN_IF_ERROR(FinishLocked());
  if (index >= answers_->size()) return absl::InternalError("no such prefetched answer");
  return (*answers_)[index];
}

// ---------------------------------------------------------------------------------------------
// Decode: one sequence's share of a batch step (client/decoder.cc runs the batch)

absl::Status Sequence::Impl::RetireHandOver(uint32_t layer, DecodeBreakdown* b) {
  if (!layers_[layer].pending) return absl::OkStatus();
  const auto t = std::chrono::steady_clock::now();
  ICECACHE_RETURN_IF_ERROR(FinishPending(layer));
  b->wait_us += MicrosSince(t);
  return absl::OkStatus();
}

absl::Status Sequence::Impl::CollectMailbox(uint32_t layer) {
  LayerState& L = layers_[layer];
  std::optional<client_internal::Ticket> append;
  std::shared_ptr<client_internal::PrefetchBatch> select;
  size_t select_index = 0;
  {
    absl::MutexLock lock(&L.mailbox->mu);
    append = std::exchange(L.mailbox->append, std::nullopt);
    select = std::exchange(L.mailbox->select, nullptr);
    select_index = L.mailbox->select_index;
    L.mailbox->append_error = absl::OkStatus();
  }
  if (select != nullptr) {
    L.prefetch = client_internal::Prefetch{
        .batch = std::move(select), .index = select_index, .query = std::move(L.next_query)};
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
  return Submit(layer, op, staged.staged.buffer, ctx_.geometry.page_size,
                static_cast<uint32_t>(staged.first), /*from_window=*/true);
}

absl::Status Sequence::Impl::BeginStep(uint32_t layer, const void* k_new, const void* v_new,
                                       void* stream, client_internal::StepState* st) {
  ICECACHE_RETURN_IF_ERROR(CheckUsable(layer));
  const ResolvedGeometry& g = ctx_.geometry;
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
  st->layer = layer;
  st->pos = L.tokens;
  st->full_kv = L.full_kv;
  st->b = DecodeBreakdown{};
  st->b.layer = layer;
  st->b.full_kv = L.full_kv;
  // The previous step's work on this layer's cache and window must be done (and, kAsync, its
  // callback must have run) before they change.
  if (L.done_recorded) ICECACHE_RETURN_IF_ERROR(be_->WaitMarker(L.done.get()));
  if (L.full_kv) {
    return be_->AppendKv(AppendKvParams{.k_new = k_new,
                                        .v_new = v_new,
                                        .k_dst = L.full_k.ptr(),
                                        .v_dst = L.full_v.ptr(),
                                        .head_stride = g.max_tokens * row_bytes_,
                                        .slot = static_cast<uint32_t>(st->pos),
                                        .kv_heads = g.num_kv_heads,
                                        .row_bytes = static_cast<uint32_t>(row_bytes_)},
                         stream);
  }
  const bool async = ctx_.selection == SelectionMode::kAsync;
  if (async) ICECACHE_RETURN_IF_ERROR(CollectMailbox(layer));
  // The index must be built before a select: wait for a pending build. A window append goes
  // on while the step's query travels (kAsync): every select runs after it anyway.
  if (!async || (L.pending && L.pending->op == abi::kOpPrefill)) {
    ICECACHE_RETURN_IF_ERROR(RetireHandOver(layer, &st->b));
  }
  if (!L.window->CanAppend()) ICECACHE_RETURN_IF_ERROR(RetireHandOver(layer, &st->b));
  selection::WindowPolicy& w = *L.window;
  const bool sink = w.NextInSink();
  const uint32_t rows = sink ? g.sink_tokens : w.ring_capacity();
  ICECACHE_RETURN_IF_ERROR(be_->AppendKv(
      AppendKvParams{.k_new = k_new,
                     .v_new = v_new,
                     .k_dst = sink ? L.sink_k.ptr() : L.ring_k.ptr(),
                     .v_dst = sink ? L.sink_v.ptr() : L.ring_v.ptr(),
                     .head_stride = uint64_t{rows} * row_bytes_,
                     .slot = static_cast<uint32_t>(sink ? st->pos : w.RingRow(st->pos)),
                     .kv_heads = g.num_kv_heads,
                     .row_bytes = static_cast<uint32_t>(row_bytes_)},
      stream));
  st->window_mark = w.Snapshot();
  ICECACHE_ASSIGN_OR_RETURN(st->hand_over, w.Append());
  st->needs_pages = L.daemon_built;
  return absl::OkStatus();
}

absl::Status Sequence::Impl::TakeQuery(const uint16_t* q_host, client_internal::StepState* st) {
  const ResolvedGeometry& g = ctx_.geometry;
  LayerState& L = layers_[st->layer];
  const size_t q_elems = size_t{g.num_q_heads} * g.head_dim;
  for (size_t i = 0; i < q_elems; ++i) {
    q_float_[i] = g.dtype == DType::kBF16 ? Bf16ToFloat(q_host[i]) : HalfToFloat(q_host[i]);
  }
  st->search.assign(g.num_kv_heads, 1);
  st->refs.clear();
  st->tail.clear();
  if (!L.prefetch) return absl::OkStatus();
  // One step ahead: the pages searched with the previous query; only the heads whose query
  // moved too far since are searched again.
  client_internal::Prefetch prefetch = std::move(*L.prefetch);
  L.prefetch.reset();
  const auto tw = std::chrono::steady_clock::now();
  absl::StatusOr<client_internal::SelectAnswer> answer = prefetch.batch->Get(prefetch.index);
  st->b.select_wait_us += MicrosSince(tw);
  if (!answer.ok()) return answer.status();
  if (!answer->status.ok()) return answer->status;
  if (answer->pages.size() != size_t{g.num_kv_heads} * k_sel_) {
    return absl::InternalError(absl::StrCat("the daemon returned ", answer->pages.size(),
                                            " page references, expected ",
                                            g.num_kv_heads * k_sel_));
  }
  ICECACHE_RETURN_IF_ERROR(CheckTail(*answer));
  if (answer->generation != tr_->generation()) {
    return absl::OkStatus();  // answered by a daemon that was replaced since: search again
  }
  st->refs = std::move(answer->pages);
  // The tail partials of the query searched one step ahead (stale by a step, like its pages;
  // drifted heads get fresh ones in AfterSelect).
  st->tail = std::move(answer->tail);
  st->generation = answer->generation;
  st->b.prefetched = true;
  tr_->stats().prefetched_selects.fetch_add(1);
  const uint32_t group = g.num_q_heads / g.num_kv_heads;
  uint32_t fallbacks = 0;
  for (uint32_t h = 0; h < g.num_kv_heads; ++h) {
    const size_t at = size_t{h} * group * g.head_dim;
    const double cosine =
        LowestCosine(prefetch.query.data() + at, q_float_.data() + at, group, g.head_dim);
    st->search[h] = cosine >= ctx_.drift_threshold ? 0 : 1;
    fallbacks += st->search[h];
  }
  st->b.drift_fallback_heads = fallbacks;
  if (fallbacks > 0) tr_->stats().drift_fallback_heads.fetch_add(fallbacks);
  return absl::OkStatus();
}

client_internal::SelectRequest Sequence::Impl::SearchRequest(
    const client_internal::StepState& st) const {
  const ResolvedGeometry& g = ctx_.geometry;
  const bool every_head =
      std::all_of(st.search.begin(), st.search.end(), [](uint8_t x) { return x != 0; });
  return client_internal::SelectRequest{.handle = ctx_.handle,
                                        .queries = q_float_.data(),
                                        .query_floats = q_float_.size(),
                                        .k = k_sel_,
                                        .head_mask = every_head ? nullptr : st.search.data(),
                                        .num_kv_heads = g.num_kv_heads,
                                        .tail_floats = tail_floats_};
}

absl::Status Sequence::Impl::CheckTail(const client_internal::SelectAnswer& answer) const {
  if (answer.tail.size() == tail_floats_) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("icecached answered a select with ", answer.tail.size(),
                                          " floats of tail partials, expected ", tail_floats_));
}

absl::Status Sequence::Impl::AfterSelect(const client_internal::SelectAnswer* searched,
                                         client_internal::StepState* st) {
  const ResolvedGeometry& g = ctx_.geometry;
  if (searched != nullptr) {
    if (!searched->status.ok()) return searched->status;
    if (searched->pages.size() != size_t{g.num_kv_heads} * k_sel_) {
      return absl::InternalError(absl::StrCat("the daemon returned ", searched->pages.size(),
                                              " page references, expected ",
                                              g.num_kv_heads * k_sel_));
    }
    ICECACHE_RETURN_IF_ERROR(CheckTail(*searched));
    if (!st->refs.empty() && st->generation != searched->generation) {
      // The prefetched pages belong to a daemon replaced during this select: every head is
      // searched again (the decoder sees ABORTED with no refs, and asks once more).
      st->refs.clear();
      st->tail.clear();
      st->search.assign(ctx_.geometry.num_kv_heads, 1);
      return absl::AbortedError("the daemon was replaced: search every head again");
    }
    st->generation = searched->generation;
    if (st->refs.empty() || st->tail.size() != searched->tail.size()) {
      st->tail = searched->tail;
    }
    if (st->refs.empty()) {
      st->refs = searched->pages;
    } else {
      const size_t group_floats = size_t{g.num_q_heads / g.num_kv_heads} * (2 + size_t{g.head_dim});
      for (uint32_t h = 0; h < g.num_kv_heads; ++h) {
        if (st->search[h] == 0) continue;
        std::copy_n(searched->pages.begin() + size_t{h} * k_sel_, k_sel_,
                    st->refs.begin() + size_t{h} * k_sel_);
        // The searched heads' query heads take the fresh tail partials too.
        if (!searched->tail.empty()) {
          std::copy_n(searched->tail.begin() + h * group_floats, group_floats,
                      st->tail.begin() + h * group_floats);
        }
      }
    }
  }
  // Every select runs after the layer's appends submitted before it: the pending one is done
  // (or nearly), and its page leaves the window now, as it enters the selected pages.
  return RetireHandOver(st->layer, &st->b);
}

absl::Status Sequence::Impl::Plan(client_internal::StepState* st,
                                  client_internal::DecodePlan* plan) {
  const ResolvedGeometry& g = ctx_.geometry;
  LayerState& L = layers_[st->layer];
  const uint64_t pos = st->pos;
  if (L.full_kv) {
    for (uint32_t h = 0; h < g.num_kv_heads; ++h) {
      plan->BeginHead();
      const uint64_t head = uint64_t{h} * g.max_tokens * row_bytes_;
      plan->AddRows(L.full_k.bytes() + head, L.full_v.bytes() + head, row_bytes_, 0, pos + 1);
    }
    return absl::OkStatus();
  }
  st->planned = true;
  const uint64_t generation = tr_->generation();
  if (!st->refs.empty() && st->generation != generation) {
    return absl::UnavailableError(
        "icecached was replaced during this decode step (its pages are gone); decode again");
  }
  if (cache_generation_ != generation) {
    // Pages cached by frame of a daemon that is gone: the new one's frames are other pages.
    for (LayerState& other : layers_) {
      if (other.cache != nullptr) other.cache->Clear();
    }
    cache_generation_ = generation;
  }
  const selection::WindowPolicy& w = *L.window;
  const uint64_t step = ++L.steps;
  const uint64_t page_bytes = layout_.page_bytes();
  const uint64_t in_sink = std::min<uint64_t>(pos + 1, g.sink_tokens);
  const uint64_t window_rows = pos + 1 > w.window_begin() ? pos + 1 - w.window_begin() : 0;
  const uint64_t row0 = w.RingRow(w.window_begin());
  const uint64_t ring = w.ring_capacity();
  DecodeBreakdown& b = st->b;
  for (uint32_t h = 0; h < g.num_kv_heads; ++h) {
    plan->BeginHead();
    if (in_sink > 0) {
      const uint64_t head = uint64_t{h} * g.sink_tokens * row_bytes_;
      plan->AddRows(L.sink_k.bytes() + head, L.sink_v.bytes() + head, row_bytes_, 0, in_sink);
    }
    if (window_rows > 0) {
      const uint64_t head = uint64_t{h} * ring * row_bytes_;
      const uint64_t first = std::min(window_rows, ring - row0);
      plan->AddRows(L.ring_k.bytes() + head, L.ring_v.bytes() + head, row_bytes_, row0, first);
      plan->AddRows(L.ring_k.bytes() + head, L.ring_v.bytes() + head, row_bytes_, 0,
                    window_rows - first);
    }
    for (uint32_t j = 0; j < k_sel_ && !st->refs.empty(); ++j) {
      const abi::SelectedPageRef& r = st->refs[size_t{h} * k_sel_ + j];
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
        plan->AddGather(src.device, slot);
        ++b.misses;
      } else {
        ++b.hits;
      }
      plan->AddPage(slot, layout_.half_bytes(), r.valid);
    }
  }
  // Map and PageBytes resolve references against the transport's current daemon: one that
  // replaced `generation` meanwhile (a recovery on another thread) could have given frames of
  // its own for these references. The same generation now means none did.
  if (!st->refs.empty() && tr_->generation() != generation) {
    return absl::UnavailableError(
        "icecached was replaced during this decode step (its pages are gone); decode again");
  }
  b.selected_pages = b.hits + b.misses;
  return absl::OkStatus();
}

absl::StatusOr<client_internal::StagedHandOver> Sequence::Impl::StageWindowPage(uint32_t layer,
                                                                                uint64_t first,
                                                                                void* stream) {
  const ResolvedGeometry& g = ctx_.geometry;
  LayerState& L = layers_[layer];
  const uint32_t P = g.page_size;
  const uint64_t ring = L.window->ring_capacity();
  const uint64_t row0 = L.window->RingRow(first);
  ICECACHE_ASSIGN_OR_RETURN(const abi::StageResponse staged, Stage(P));
  absl::StatusOr<client_internal::ArenaSpan> dst = tr_->Map(staged.buffer, staged.bytes);
  absl::Status st = dst.status();
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
  return client_internal::StagedHandOver{.staged = staged, .first = first};
}

void Sequence::Impl::AbortStep(client_internal::StepState* st) {
  if (st->finished || !st->window_mark || st->layer >= layers_.size()) return;
  LayerState& L = layers_[st->layer];
  if (L.window != nullptr) {
    const absl::Status rewound = L.window->Rewind(*st->window_mark);
    // Only a page of this step retired during it could refuse, and a step retires only pages
    // handed over before it: the layer fails rather than go on with a window it cannot trust.
    if (!rewound.ok()) L.failed = rewound;
  }
  st->window_mark.reset();
  if (st->planned && L.cache != nullptr) L.cache->Clear();
}

absl::Status Sequence::Impl::FinishStep(client_internal::StepState* st, void* stream) {
  st->finished = true;
  LayerState& L = layers_[st->layer];
  abi::ClientStats& stats = tr_->stats();
  stats.cache_hits.fetch_add(st->b.hits);
  stats.cache_misses.fetch_add(st->b.misses);
  L.tokens = st->pos + 1;
  stats.decode_steps.fetch_add(1);
  if (!st->hand_over) return absl::OkStatus();
  absl::StatusOr<client_internal::StagedHandOver> staged =
      StageWindowPage(st->layer, *st->hand_over, stream);
  if (!staged.ok()) {
    L.failed = staged.status();
    return staged.status();
  }
  if (ctx_.selection == SelectionMode::kAsync) {
    // Submitted by the batch's end-of-step callback, once the copies and the step's gather
    // are done.
    L.staged = *staged;
    return absl::OkStatus();
  }
  // kSync: the copies must land before the daemon reads them, and this step's gather must be
  // done with the layer's frames before an insert may rewrite them.
  absl::Status s = be_->Synchronize(stream);
  if (s.ok()) {
    s = Submit(st->layer, L.daemon_built ? abi::kOpAppend : abi::kOpPrefill, staged->staged.buffer,
               ctx_.geometry.page_size, static_cast<uint32_t>(staged->first), /*from_window=*/true);
  } else {
    (void)tr_->ReleaseStaging(ctx_.handle, staged->staged.buffer);
  }
  if (!s.ok()) L.failed = s;
  return s;
}

Sequence::Impl::EndOfStep Sequence::Impl::EndOfStepWork(uint32_t layer) {
  LayerState& L = layers_[layer];
  EndOfStep e;
  e.staged = L.staged;
  e.op = L.daemon_built ? abi::kOpAppend : abi::kOpPrefill;
  e.send_select = L.daemon_built;
  e.mailbox = L.mailbox.get();
  if (e.send_select) L.next_query = q_float_;
  return e;
}

client_internal::SelectRequest Sequence::Impl::PrefetchRequest(uint32_t layer) const {
  const LayerState& L = layers_[layer];
  return client_internal::SelectRequest{.handle = ctx_.handle,
                                        .queries = L.next_query.data(),
                                        .query_floats = L.next_query.size(),
                                        .k = k_sel_,
                                        .head_mask = nullptr,
                                        .num_kv_heads = ctx_.geometry.num_kv_heads,
                                        .tail_floats = tail_floats_};
}

absl::Status Sequence::Impl::MarkDone(uint32_t layer, void* stream) {
  if (layer >= layers_.size() || layers_[layer].done == nullptr) return absl::OkStatus();
  LayerState& L = layers_[layer];
  ICECACHE_RETURN_IF_ERROR(be_->Record(L.done.get(), stream));
  L.done_recorded = true;
  return absl::OkStatus();
}

bool Sequence::Impl::FinishOldestPending() {
  if (pending_order_.empty()) return false;
  (void)FinishPending(pending_order_.front());
  return true;
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
    L.prefetch.reset();  // the batch's ticket is finished by its last holder
  }
  while (!pending_order_.empty()) {
    absl::Status st = FinishPending(pending_order_.front());
    if (first.ok() && !st.ok() && st.code() != absl::StatusCode::kUnavailable) first = st;
  }
  layers_.clear();
  absl::Status dropped = tr_->DropSequence(ctx_.handle);
  if (!dropped.ok() && first.ok()) first = dropped;
  return first;
}

absl::StatusOr<Sequence::AttendedRows> Sequence::Impl::LastAttended(uint32_t layer,
                                                                    uint32_t head) const {
  ICECACHE_RETURN_IF_ERROR(CheckUsable(layer));
  if (head >= ctx_.geometry.num_kv_heads) return absl::InvalidArgumentError("head out of range");
  const LayerState& L = layers_[layer];
  if (L.last_offsets.size() != size_t{ctx_.geometry.num_kv_heads} + 1) {
    return absl::FailedPreconditionError("the layer was not decoded yet");
  }
  if (L.done_recorded) ICECACHE_RETURN_IF_ERROR(be_->WaitMarker(L.done.get()));
  AttendedRows rows;
  const size_t elems = ctx_.geometry.head_dim;
  for (uint32_t c = L.last_offsets[head]; c < L.last_offsets[head + 1]; ++c) {
    const AttentionChunk& ch = L.last_chunks[c];
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

void Sequence::Impl::KeepAttended(uint32_t layer, const client_internal::DecodePlan& plan,
                                  uint32_t head_base) {
  LayerState& L = layers_[layer];
  const std::vector<AttentionChunk>& chunks = plan.chunks();
  const std::vector<uint32_t>& offsets = plan.offsets();
  const uint32_t kv = ctx_.geometry.num_kv_heads;
  L.last_chunks.assign(chunks.begin() + offsets[head_base],
                       chunks.begin() + offsets[head_base + kv]);
  L.last_offsets.resize(kv + 1);
  for (uint32_t h = 0; h <= kv; ++h)
    L.last_offsets[h] = offsets[head_base + h] - offsets[head_base];
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

Sequence::Impl* client_internal::SequenceFactory::ImplOf(Sequence* sequence) {
  return sequence->impl_.get();
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
  Sequence::Impl* self = impl_.get();
  return impl_->context().decoder->DecodeBatch(layer, absl::MakeConstSpan(&self, 1), q, k_new,
                                               v_new, out, stream, nullptr);
}
absl::Status Sequence::Drop() { return impl_->Drop(); }
uint64_t Sequence::tokens(uint32_t layer) const { return impl_->tokens(layer); }
const DecodeBreakdown& Sequence::last_decode() const { return impl_->last(); }
uint64_t Sequence::kv_device_bytes() const { return impl_->kv_device_bytes(); }
absl::StatusOr<Sequence::AttendedRows> Sequence::LastAttended(uint32_t layer, uint32_t head) const {
  return impl_->LastAttended(layer, head);
}

}  // namespace icecache
