// The client library's logic, shared by the CPU and CUDA modes (client/backend.h is the only
// difference). How a decode step of an offloaded layer runs:
//
//   1. finish the layer's pending daemon operation (its prompt's index build, or the insert
//      of the window page handed over at an earlier step) and retire the tokens it took;
//   2. append the new token's K/V to the sink (first sink_tokens positions) or the window ring;
//   3. copy the queries to the host and ask the daemon for the matching pages (one select);
//   4. look every selected page up in the layer's page cache: a page resident at the same
//      version is a hit; misses take the least recently used slot and are fetched by one
//      gather launch for all KV heads, straight from the mapped arena;
//   5. attention over sink + window + the selected pages (one launch for all heads);
//   6. when the window holds window_tokens tokens, hand its oldest page to the daemon (staged,
//      then inserted into the index asynchronously); the tokens stay in the window until step
//      1 of the layer's next Decode sees the insert done.
//
// So every step attends to (window_tokens - page_size, window_tokens] window tokens, the
// paper's policy (the same as eval::HeadSelector's): the prefill keeps window_tokens - 1 of
// the prompt's last tokens, the first decode token completes the window.
//
// The window is a ring of window_tokens + page_size rows per KV head; position p lives in row
// (p - ring_origin) % capacity, and pages leave it whole and unwrapped because the capacity and
// every hand-over are multiples of page_size from ring_origin.
#include "icecache/client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/backend.h"
#include "common/half.h"
#include "common/paths.h"
#include "common/status_macros.h"
#include "icecache/attachment.h"
#include "icecache/v1/icecache.grpc.pb.h"
#include "kernels/page_layout.h"
#include "proto/icecache/v1/abi.h"

namespace icecache {

using client_internal::Backend;
using client_internal::Marker;

const char* ExecutionModeName(ExecutionMode mode) {
  switch (mode) {
    case ExecutionMode::kAuto:
      return "auto";
    case ExecutionMode::kCpu:
      return "cpu";
    case ExecutionMode::kCuda:
      return "cuda";
  }
  return "unknown";
}

namespace {

// Longest chunk handed to attention: long runs (full-KV layers, long windows) are cut so that
// the kernel's splits have work to share.
constexpr uint32_t kChunkRows = 128;
constexpr uint32_t kMaxSplits = 64;

double MicrosSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Client::Impl

class Client::Impl {
 public:
  ClientOptions options;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Attachment> attachment;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::IceCache::Stub> stub;

  struct Segment {
    uint8_t* host = nullptr;
    uint8_t* device = nullptr;
    uint64_t bytes = 0;
  };
  absl::Mutex seg_mu;
  std::vector<Segment> segments ABSL_GUARDED_BY(seg_mu) =
      std::vector<Segment>(abi::kMaxSegments);

  ~Impl() {
    // Registrations go before the attachment unmaps the segments.
    absl::MutexLock lock(&seg_mu);
    for (Segment& s : segments) {
      if (s.host != nullptr) backend->UnregisterHost(s.host);
      s = Segment{};
    }
  }

  absl::Status OnSegmentMapped(uint32_t segment, void* base, uint64_t bytes) {
    absl::StatusOr<void*> device = backend->RegisterHost(base, bytes);
    if (!device.ok()) return device.status();
    absl::MutexLock lock(&seg_mu);
    segments[segment] = {static_cast<uint8_t*>(base), static_cast<uint8_t*>(*device), bytes};
    return absl::OkStatus();
  }

  // The device-visible address of `bytes` at `ref` in the arena (mapping and registering the
  // segment on first use), and its host address.
  absl::StatusOr<uint8_t*> DeviceAddress(const abi::ArenaRef& ref, uint64_t bytes,
                                         uint8_t** host_out = nullptr) {
    if (ref.segment == 0 || ref.segment >= abi::kMaxSegments) {
      return absl::InternalError("the daemon returned a reference outside the data segments");
    }
    for (int attempt = 0; attempt < 2; ++attempt) {
      {
        absl::MutexLock lock(&seg_mu);
        const Segment& s = segments[ref.segment];
        if (s.host != nullptr) {
          if (ref.offset > s.bytes || bytes > s.bytes - ref.offset) {
            return absl::InternalError("the daemon returned a reference outside its segment");
          }
          if (host_out != nullptr) *host_out = s.host + ref.offset;
          return s.device + ref.offset;
        }
      }
      // Maps (and through the hook registers) the segment.
      absl::StatusOr<uint8_t*> host = attachment->Address(ref, bytes);
      if (!host.ok()) return host.status();
    }
    return absl::InternalError("an arena segment could not be registered");
  }

  absl::Status CallOptionsFor(grpc::ClientContext* ctx) const {
    ctx->AddMetadata(abi::kTokenMetadataKey, attachment->token());
    ctx->set_deadline(std::chrono::system_clock::now() +
                      absl::ToChronoMilliseconds(options.timeout));
    return absl::OkStatus();
  }
};

// ---------------------------------------------------------------------------------------------
// Sequence::Impl

namespace {

struct CacheEntry {
  uint32_t segment = abi::kNoSegment;
  uint32_t frame = 0;
  uint32_t version = 0;
  uint64_t last_used = 0;  // decode step of the layer that last selected it (0: never)
};

struct PendingOp {
  uint32_t slot = 0;
  uint32_t op = 0;  // abi::kOpPrefill / kOpAppend
  abi::ArenaRef staging{};
  uint32_t tokens = 0;
  bool from_window = false;  // a window page: its tokens leave the window when it is done
};

// Working memory owned through the backend.
struct Buffer {
  Backend* backend = nullptr;
  void* ptr = nullptr;
  bool host = false;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : backend(o.backend), ptr(o.ptr), host(o.host) { o.ptr = nullptr; }
  ~Buffer() { Reset(); }
  void Reset() {
    if (ptr != nullptr) host ? backend->FreeHost(ptr) : backend->Free(ptr);
    ptr = nullptr;
  }
  absl::Status Allocate(Backend* b, size_t bytes, bool on_host = false) {
    Reset();
    backend = b;
    host = on_host;
    absl::StatusOr<void*> p = on_host ? b->AllocateHost(bytes) : b->Allocate(bytes);
    if (!p.ok()) return p.status();
    ptr = *p;
    return absl::OkStatus();
  }
  uint8_t* bytes() const { return static_cast<uint8_t*>(ptr); }
};

struct LayerState {
  bool full_kv = false;
  bool prefilled = false;
  absl::Status failed;  // non-OK: the layer is unusable (a daemon operation failed)
  uint64_t tokens = 0;  // positions so far
  uint64_t steps = 0;   // Decode calls

  // Full-KV layers: [kv][max_tokens][row].
  Buffer full_k, full_v;

  // Offloaded layers.
  Buffer sink_k, sink_v;  // [kv][sink][row]
  Buffer ring_k, ring_v;  // [kv][ring_capacity][row]
  uint64_t ring_origin = 0;
  uint64_t window_begin = 0;  // [sink, window_begin): the daemon's (or its pending prefill's)
  bool daemon_built = false;  // the daemon's layer holds an index
  std::optional<PendingOp> pending;
  Buffer cache;  // [kv][cache_slots][page_bytes]
  std::vector<CacheEntry> entries;  // [kv][cache_slots]
  std::vector<absl::flat_hash_map<uint64_t, uint32_t>> where;  // per head: (segment, frame) -> slot

  // Descriptors: built on the host (pinned), copied to working memory each step.
  Buffer desc_host, desc_dev;
  Buffer scratch;
  size_t scratch_bytes = 0;
  std::unique_ptr<Marker> done, fetch_begin, fetch_end;
  bool done_recorded = false;
  bool fetch_pending_timing = false;

  // The last Decode's chunks (device-visible pointers) and offsets, for LastAttended.
  std::vector<AttentionChunk> chunks;
  std::vector<uint32_t> offsets;
};

}  // namespace

class Sequence::Impl {
 public:
  Client::Impl* client = nullptr;
  Backend* be = nullptr;
  std::string handle;
  ResolvedGeometry g;
  PageLayout layout;
  float scale = 0;
  uint64_t row_bytes = 0;
  uint32_t ring_capacity = 0;
  uint32_t cache_slots = 0;
  uint32_t k_sel = 0;
  uint32_t max_chunks_per_head = 0;
  std::vector<LayerState> layers;
  std::deque<uint32_t> pending_order;  // layers with a pending op, oldest first
  std::optional<uint32_t> prompt_tokens;
  uint32_t prefilled_layers = 0;
  bool dropped = false;
  DecodeBreakdown last;
  Buffer q_host;  // [num_q_heads][head_dim] of the dtype (pinned)
  std::vector<float> q_float;

  ~Impl() {
    if (!dropped) (void)Drop();
  }

  size_t DescBytes() const {
    const size_t items = size_t{g.num_kv_heads} * k_sel * sizeof(GatherItem);
    const size_t chunks = size_t{g.num_kv_heads} * max_chunks_per_head * sizeof(AttentionChunk);
    const size_t offsets = (g.num_kv_heads + 1) * sizeof(uint32_t);
    return (items + 15) / 16 * 16 + (chunks + 15) / 16 * 16 + offsets;
  }

  absl::Status CheckUsable(uint32_t layer) const {
    if (dropped) return absl::FailedPreconditionError("the sequence was dropped");
    if (layer >= g.num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, " out of range (the sequence has ", g.num_layers, ")"));
    }
    if (!layers[layer].failed.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", layer, " failed earlier: ", layers[layer].failed.message()));
    }
    return absl::OkStatus();
  }

  // Applies the finished pending op of `layer`.
  absl::Status FinishPending(uint32_t layer) {
    LayerState& L = layers[layer];
    if (!L.pending) return absl::OkStatus();
    const PendingOp op = *L.pending;
    L.pending.reset();
    pending_order.erase(std::find(pending_order.begin(), pending_order.end(), layer));
    absl::Status st = client->attachment->Finish(op.slot);
    if (!st.ok()) {
      // The daemon consumes staging only on success; hand it back (best effort).
      (void)client->attachment->ReleaseStaging(handle, op.staging);
      L.failed = st;
      return absl::Status(st.code(), absl::StrCat("layer ", layer, ": ", st.message()));
    }
    L.daemon_built = true;
    if (op.from_window) L.window_begin += op.tokens;
    return absl::OkStatus();
  }

  // Runs `f` (which takes a request slot); when every slot is taken by pending operations,
  // finishes the oldest and tries again.
  template <typename F>
  auto WithSlot(F f) -> decltype(f()) {
    while (true) {
      auto r = f();
      if (r.ok() || r.status().code() != absl::StatusCode::kResourceExhausted ||
          r.status().message() != "every request slot is in use" || pending_order.empty()) {
        return r;
      }
      const uint32_t oldest = pending_order.front();
      absl::Status st = FinishPending(oldest);
      if (!st.ok()) return st;
    }
  }

  absl::Status Submit(uint32_t layer, uint32_t op, const abi::ArenaRef& staging, uint32_t tokens,
                      uint32_t first_position, bool from_window) {
    absl::StatusOr<uint32_t> slot = WithSlot([&] {
      return client->attachment->SubmitStaged(op, handle, layer, staging, tokens, first_position);
    });
    if (!slot.ok()) {
      (void)client->attachment->ReleaseStaging(handle, staging);
      return slot.status();
    }
    PendingOp p;
    p.slot = *slot;
    p.op = op;
    p.staging = staging;
    p.tokens = tokens;
    p.from_window = from_window;
    layers[layer].pending = p;
    pending_order.push_back(layer);
    return absl::OkStatus();
  }

  absl::StatusOr<abi::StageResponse> Stage(uint32_t tokens) {
    return WithSlot([&] { return client->attachment->Stage(handle, tokens); });
  }

  absl::Status AllocateLayer(uint32_t layer) {
    LayerState& L = layers[layer];
    const size_t kv = g.num_kv_heads;
    if (L.full_kv) {
      ICECACHE_RETURN_IF_ERROR(L.full_k.Allocate(be, kv * g.max_tokens * row_bytes));
      ICECACHE_RETURN_IF_ERROR(L.full_v.Allocate(be, kv * g.max_tokens * row_bytes));
    } else {
      if (g.sink_tokens > 0) {
        ICECACHE_RETURN_IF_ERROR(L.sink_k.Allocate(be, kv * g.sink_tokens * row_bytes));
        ICECACHE_RETURN_IF_ERROR(L.sink_v.Allocate(be, kv * g.sink_tokens * row_bytes));
      }
      ICECACHE_RETURN_IF_ERROR(L.ring_k.Allocate(be, kv * ring_capacity * row_bytes));
      ICECACHE_RETURN_IF_ERROR(L.ring_v.Allocate(be, kv * ring_capacity * row_bytes));
      ICECACHE_RETURN_IF_ERROR(L.cache.Allocate(be, kv * cache_slots * layout.page_bytes()));
      L.entries.assign(kv * cache_slots, CacheEntry{});
      L.where.assign(kv, {});
    }
    const size_t desc = DescBytes();
    ICECACHE_RETURN_IF_ERROR(L.desc_host.Allocate(be, desc, /*on_host=*/true));
    ICECACHE_RETURN_IF_ERROR(L.desc_dev.Allocate(be, desc));
    DecodeAttentionParams probe;
    probe.num_q_heads = g.num_q_heads;
    probe.num_kv_heads = g.num_kv_heads;
    probe.head_dim = g.head_dim;
    L.scratch_bytes = be->AttentionScratchBytes(probe, kMaxSplits);
    if (L.scratch_bytes > 0) ICECACHE_RETURN_IF_ERROR(L.scratch.Allocate(be, L.scratch_bytes));
    for (std::unique_ptr<Marker>* m : {&L.done, &L.fetch_begin, &L.fetch_end}) {
      absl::StatusOr<std::unique_ptr<Marker>> made = be->CreateMarker();
      if (!made.ok()) return made.status();
      *m = std::move(*made);
    }
    return absl::OkStatus();
  }

  absl::Status Prefill(uint32_t layer, const void* k, const void* v, uint32_t n, void* stream);
  absl::Status Decode(uint32_t layer, const void* q, const void* k_new, const void* v_new,
                      void* out, void* stream);
  absl::Status Drop();
  absl::StatusOr<Sequence::AttendedRows> LastAttended(uint32_t layer, uint32_t head) const;

 private:
  // Appends rows [begin, begin + count) of one head's buffer as chunks of <= kChunkRows.
  void AddRun(const uint8_t* k, const uint8_t* v, uint64_t begin, uint64_t count,
              std::vector<AttentionChunk>* out) const {
    while (count > 0) {
      const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(count, kChunkRows));
      out->push_back({k + begin * row_bytes, v + begin * row_bytes, n, 0});
      begin += n;
      count -= n;
    }
  }
  absl::Status HandOverWindowPage(uint32_t layer, void* stream);
};


// ---------------------------------------------------------------------------------------------
// Prefill

absl::Status Sequence::Impl::Prefill(uint32_t layer, const void* k, const void* v, uint32_t n,
                                     void* stream) {
  ICECACHE_RETURN_IF_ERROR(CheckUsable(layer));
  LayerState& L = layers[layer];
  if (L.prefilled) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " was prefilled already"));
  }
  if (k == nullptr || v == nullptr) return absl::InvalidArgumentError("k and v must not be null");
  if (n == 0) return absl::InvalidArgumentError("tokens must be > 0");
  if (n > g.max_tokens) {
    return absl::ResourceExhaustedError(
        absl::StrCat(n, " prompt tokens exceed the sequence's max_tokens ", g.max_tokens));
  }
  if (prompt_tokens && *prompt_tokens != n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "every layer's prompt has the same length: earlier layers had ", *prompt_tokens,
        " tokens, layer ", layer, " has ", n));
  }
  ICECACHE_RETURN_IF_ERROR(AllocateLayer(layer));
  const uint32_t kv = g.num_kv_heads;
  const uint32_t rb = static_cast<uint32_t>(row_bytes);
  if (L.full_kv) {
    WriteStagingParams w{k, v, L.full_k.ptr, L.full_v.ptr, 0, n, kv, rb,
                         g.max_tokens * row_bytes, 0};
    ICECACHE_RETURN_IF_ERROR(be->WriteStaging(w, stream));
  } else {
    const uint32_t S = g.sink_tokens;
    const uint32_t in_sink = std::min(n, S);
    const uint32_t rest = n - in_sink;
    const uint32_t in_window = std::min(rest, g.window_tokens - 1);
    const uint32_t offloaded = rest - in_window;
    if (in_sink > 0) {
      WriteStagingParams w{k, v, L.sink_k.ptr, L.sink_v.ptr, 0, in_sink, kv, rb,
                           uint64_t{S} * row_bytes, 0};
      ICECACHE_RETURN_IF_ERROR(be->WriteStaging(w, stream));
    }
    L.ring_origin = L.window_begin = std::max<uint64_t>(S, n - in_window);
    if (in_window > 0) {
      WriteStagingParams w{k, v, L.ring_k.ptr, L.ring_v.ptr, n - in_window, in_window, kv, rb,
                           uint64_t{ring_capacity} * row_bytes, 0};
      ICECACHE_RETURN_IF_ERROR(be->WriteStaging(w, stream));
    }
    if (offloaded > 0) {
      absl::StatusOr<abi::StageResponse> staged = Stage(offloaded);
      if (!staged.ok()) return staged.status();
      absl::StatusOr<uint8_t*> dst = client->DeviceAddress(staged->buffer, staged->bytes);
      absl::Status st = dst.status();
      if (st.ok()) {
        WriteStagingParams w{k, v, *dst, *dst + staged->v_offset, in_sink, offloaded, kv, rb, 0,
                             0};
        st = be->WriteStaging(w, stream);
      }
      // The daemon reads the staging buffer as soon as the prefill is submitted.
      if (st.ok()) st = be->Synchronize(stream);
      if (!st.ok()) {
        (void)client->attachment->ReleaseStaging(handle, staged->buffer);
        return st;
      }
      ICECACHE_RETURN_IF_ERROR(
          Submit(layer, abi::kOpPrefill, staged->buffer, offloaded, in_sink, /*from_window=*/false));
    }
  }
  L.tokens = n;
  L.prefilled = true;
  prompt_tokens = n;
  ++prefilled_layers;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Decode

absl::Status Sequence::Impl::HandOverWindowPage(uint32_t layer, void* stream) {
  LayerState& L = layers[layer];
  const uint32_t P = g.page_size;
  absl::StatusOr<abi::StageResponse> staged = Stage(P);
  if (!staged.ok()) return staged.status();
  absl::StatusOr<uint8_t*> dst = client->DeviceAddress(staged->buffer, staged->bytes);
  absl::Status st = dst.status();
  const uint64_t row0 = (L.window_begin - L.ring_origin) % ring_capacity;
  if (st.ok()) {
    st = be->Copy2D(*dst, P * row_bytes, L.ring_k.bytes() + row0 * row_bytes,
                    ring_capacity * row_bytes, P * row_bytes, g.num_kv_heads, stream);
  }
  if (st.ok()) {
    st = be->Copy2D(*dst + staged->v_offset, P * row_bytes, L.ring_v.bytes() + row0 * row_bytes,
                    ring_capacity * row_bytes, P * row_bytes, g.num_kv_heads, stream);
  }
  // The copies must land before the daemon reads them, and this step's gather must be done
  // with the layer's frames before an insert may rewrite them.
  if (st.ok()) st = be->Synchronize(stream);
  if (!st.ok()) {
    (void)client->attachment->ReleaseStaging(handle, staged->buffer);
    return st;
  }
  return Submit(layer, L.daemon_built ? abi::kOpAppend : abi::kOpPrefill, staged->buffer, P,
                static_cast<uint32_t>(L.window_begin), /*from_window=*/true);
}

absl::Status Sequence::Impl::Decode(uint32_t layer, const void* q, const void* k_new,
                                    const void* v_new, void* out, void* stream) {
  const auto t0 = std::chrono::steady_clock::now();
  ICECACHE_RETURN_IF_ERROR(CheckUsable(layer));
  if (q == nullptr || k_new == nullptr || v_new == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("q, k_new, v_new and out must not be null");
  }
  if (prefilled_layers != g.num_layers) {
    return absl::FailedPreconditionError(absl::StrCat(
        "every layer must be prefilled before decoding (", prefilled_layers, " of ",
        g.num_layers, " are)"));
  }
  LayerState& L = layers[layer];
  uint64_t min_tokens = std::numeric_limits<uint64_t>::max();
  for (const LayerState& other : layers) min_tokens = std::min(min_tokens, other.tokens);
  if (L.tokens != min_tokens) {
    return absl::FailedPreconditionError(absl::StrCat(
        "layer ", layer, " is a step ahead: decode every layer of a step before the next step"));
  }
  if (L.tokens >= g.max_tokens) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the sequence reached its max_tokens ", g.max_tokens));
  }
  const ClientOptions& opt = client->options;
  DecodeBreakdown b;
  b.layer = layer;
  b.full_kv = L.full_kv;
  const uint32_t kv = g.num_kv_heads;
  const uint32_t rb = static_cast<uint32_t>(row_bytes);
  const uint64_t pos = L.tokens;
  abi::ClientStats& stats = client->attachment->stats();

  // The previous step's work on this layer's descriptors and cache must be done before they
  // are rewritten; its fetch time is known then.
  if (L.done_recorded) ICECACHE_RETURN_IF_ERROR(be->WaitMarker(L.done.get()));
  if (L.fetch_pending_timing) {
    absl::StatusOr<double> us = be->ElapsedUs(L.fetch_begin.get(), L.fetch_end.get());
    if (us.ok()) stats.fetch_nanoseconds.fetch_add(static_cast<uint64_t>(*us * 1000.0));
    L.fetch_pending_timing = false;
  }

  // 1. the pending daemon operation.
  if (L.pending) {
    const auto tw = std::chrono::steady_clock::now();
    ICECACHE_RETURN_IF_ERROR(FinishPending(layer));
    b.wait_us = MicrosSince(tw);
  }

  // 2. the new token.
  uint8_t* const base = L.desc_host.bytes();
  std::vector<AttentionChunk>& chunks = L.chunks;
  std::vector<uint32_t>& offsets = L.offsets;
  chunks.clear();
  offsets.assign(kv + 1, 0);
  std::vector<GatherItem> items;
  if (L.full_kv) {
    AppendKvParams a{k_new, v_new, L.full_k.ptr, L.full_v.ptr, g.max_tokens * row_bytes,
                     static_cast<uint32_t>(pos), kv, rb};
    ICECACHE_RETURN_IF_ERROR(be->AppendKv(a, stream));
    for (uint32_t h = 0; h < kv; ++h) {
      offsets[h] = static_cast<uint32_t>(chunks.size());
      const uint64_t head = uint64_t{h} * g.max_tokens * row_bytes;
      AddRun(L.full_k.bytes() + head, L.full_v.bytes() + head, 0, pos + 1, &chunks);
    }
    offsets[kv] = static_cast<uint32_t>(chunks.size());
    b.attended_tokens = static_cast<uint32_t>((pos + 1) * kv);
  } else {
    const uint32_t S = g.sink_tokens;
    if (pos < S) {
      AppendKvParams a{k_new, v_new, L.sink_k.ptr, L.sink_v.ptr, uint64_t{S} * row_bytes,
                       static_cast<uint32_t>(pos), kv, rb};
      ICECACHE_RETURN_IF_ERROR(be->AppendKv(a, stream));
    } else {
      if (pos + 1 - L.window_begin > ring_capacity) {
        return absl::InternalError("the window ring overflowed");
      }
      AppendKvParams a{k_new, v_new, L.ring_k.ptr, L.ring_v.ptr,
                       uint64_t{ring_capacity} * row_bytes,
                       static_cast<uint32_t>((pos - L.ring_origin) % ring_capacity), kv, rb};
      ICECACHE_RETURN_IF_ERROR(be->AppendKv(a, stream));
    }

    // 3. select.
    std::vector<abi::SelectedPageRef> refs;
    if (L.daemon_built) {
      const size_t q_elems = size_t{g.num_q_heads} * g.head_dim;
      ICECACHE_RETURN_IF_ERROR(be->Copy(q_host.ptr, q, q_elems * 2, stream));
      ICECACHE_RETURN_IF_ERROR(be->Synchronize(stream));
      const auto ts = std::chrono::steady_clock::now();
      const uint16_t* qh = static_cast<const uint16_t*>(q_host.ptr);
      for (size_t i = 0; i < q_elems; ++i) {
        q_float[i] = g.dtype == DType::kBF16 ? Bf16ToFloat(qh[i]) : HalfToFloat(qh[i]);
      }
      absl::StatusOr<std::vector<abi::SelectedPageRef>> sel = WithSlot([&] {
        return client->attachment->Select(handle, layer, q_float.data(), q_elems, k_sel);
      });
      if (!sel.ok()) return sel.status();
      refs = std::move(*sel);
      b.select_us = MicrosSince(ts);
      if (refs.size() != size_t{kv} * k_sel) {
        return absl::InternalError(absl::StrCat("the daemon returned ", refs.size(),
                                                " page references, expected ", kv * k_sel));
      }
    }

    // 4. the page cache.
    const uint64_t step = ++L.steps;
    uint32_t hits = 0, misses = 0;
    std::vector<std::vector<AttentionChunk>> page_chunks(kv);
    for (uint32_t h = 0; h < kv && !refs.empty(); ++h) {
      CacheEntry* entries = &L.entries[size_t{h} * cache_slots];
      auto& where = L.where[h];
      for (uint32_t j = 0; j < k_sel; ++j) {
        const abi::SelectedPageRef& r = refs[size_t{h} * k_sel + j];
        if (r.segment == abi::kNoSegment || r.valid == 0) continue;
        if (r.valid > g.page_size) return absl::InternalError("a page's valid count is too big");
        const uint64_t key = (uint64_t{r.segment} << 32) | r.frame;
        uint32_t slot;
        auto it = where.find(key);
        if (it != where.end() && entries[it->second].version == r.version) {
          slot = it->second;
          ++hits;
        } else {
          if (it != where.end()) {
            slot = it->second;  // resident at an old version: refetch in place
          } else {
            slot = 0;
            for (uint32_t c = 1; c < cache_slots; ++c) {
              if (entries[c].last_used < entries[slot].last_used) slot = c;
            }
            if (entries[slot].last_used == step) {
              return absl::InternalError("the page cache is smaller than one step's selection");
            }
            if (entries[slot].segment != abi::kNoSegment) {
              where.erase((uint64_t{entries[slot].segment} << 32) | entries[slot].frame);
            }
            where[key] = slot;
          }
          if (client->attachment->header()->segments[r.segment % abi::kMaxSegments].page_bytes !=
              layout.page_bytes()) {
            return absl::InternalError("the daemon returned a page of another page size");
          }
          absl::StatusOr<uint8_t*> src =
              client->DeviceAddress(abi::ArenaRef{r.segment, 0, uint64_t{r.frame} *
                                                                    layout.page_bytes()},
                                    layout.page_bytes());
          if (!src.ok()) return src.status();
          entries[slot].segment = r.segment;
          entries[slot].frame = r.frame;
          entries[slot].version = r.version;
          items.push_back({*src, L.cache.bytes() + (size_t{h} * cache_slots + slot) *
                                                       layout.page_bytes()});
          ++misses;
        }
        entries[slot].last_used = step;
        const uint8_t* page =
            L.cache.bytes() + (size_t{h} * cache_slots + slot) * layout.page_bytes();
        page_chunks[h].push_back({page, page + layout.half_bytes(), r.valid, 0});
      }
    }
    b.hits = hits;
    b.misses = misses;
    b.selected_pages = hits + misses;

    // 5. chunks: sink, window, pages.
    const uint64_t in_sink = std::min<uint64_t>(pos + 1, S);
    const uint64_t win_count = pos + 1 > L.window_begin ? pos + 1 - L.window_begin : 0;
    const uint64_t row0 = (L.window_begin - L.ring_origin) % ring_capacity;
    for (uint32_t h = 0; h < kv; ++h) {
      offsets[h] = static_cast<uint32_t>(chunks.size());
      if (in_sink > 0) {
        const uint64_t head = uint64_t{h} * S * row_bytes;
        AddRun(L.sink_k.bytes() + head, L.sink_v.bytes() + head, 0, in_sink, &chunks);
      }
      if (win_count > 0) {
        const uint64_t head = uint64_t{h} * ring_capacity * row_bytes;
        const uint64_t first = std::min<uint64_t>(win_count, ring_capacity - row0);
        AddRun(L.ring_k.bytes() + head, L.ring_v.bytes() + head, row0, first, &chunks);
        AddRun(L.ring_k.bytes() + head, L.ring_v.bytes() + head, 0, win_count - first, &chunks);
      }
      chunks.insert(chunks.end(), page_chunks[h].begin(), page_chunks[h].end());
    }
    offsets[kv] = static_cast<uint32_t>(chunks.size());
    uint64_t page_tokens = 0;
    for (const auto& head_chunks : page_chunks) {
      for (const AttentionChunk& c : head_chunks) page_tokens += c.count;
    }
    b.attended_tokens = static_cast<uint32_t>((in_sink + win_count) * kv + page_tokens);
  }

  // Descriptors to working memory in one copy: [items | chunks | offsets].
  uint32_t max_per_head = 0;
  for (uint32_t h = 0; h < kv; ++h) max_per_head = std::max(max_per_head, offsets[h + 1] - offsets[h]);
  if (chunks.size() > size_t{kv} * max_chunks_per_head || items.size() > size_t{kv} * k_sel) {
    return absl::InternalError("descriptor buffer too small");
  }
  const size_t items_bytes = (size_t{kv} * k_sel * sizeof(GatherItem) + 15) / 16 * 16;
  const size_t chunks_bytes =
      (size_t{kv} * max_chunks_per_head * sizeof(AttentionChunk) + 15) / 16 * 16;
  std::memcpy(base, items.data(), items.size() * sizeof(GatherItem));
  std::memcpy(base + items_bytes, chunks.data(), chunks.size() * sizeof(AttentionChunk));
  std::memcpy(base + items_bytes + chunks_bytes, offsets.data(), offsets.size() * sizeof(uint32_t));
  const size_t used = items_bytes + chunks_bytes + offsets.size() * sizeof(uint32_t);
  ICECACHE_RETURN_IF_ERROR(be->Copy(L.desc_dev.ptr, base, used, stream));
  auto* dev = L.desc_dev.bytes();

  // 4b. the gather of every missed page of the layer, one launch.
  const auto tf = std::chrono::steady_clock::now();
  if (!items.empty()) {
    ICECACHE_RETURN_IF_ERROR(be->Record(L.fetch_begin.get(), stream));
    ICECACHE_RETURN_IF_ERROR(be->Gather(reinterpret_cast<const GatherItem*>(dev),
                                         static_cast<uint32_t>(items.size()),
                                         layout.page_bytes(), stream));
    ICECACHE_RETURN_IF_ERROR(be->Record(L.fetch_end.get(), stream));
    L.fetch_pending_timing = true;
    stats.fetched_bytes.fetch_add(items.size() * layout.page_bytes());
    if (opt.profile) {
      absl::StatusOr<double> us = be->ElapsedUs(L.fetch_begin.get(), L.fetch_end.get());
      if (!us.ok()) return us.status();
      stats.fetch_nanoseconds.fetch_add(static_cast<uint64_t>(*us * 1000.0));
      L.fetch_pending_timing = false;
    }
  }
  b.fetch_us = MicrosSince(tf);

  // 5b. attention.
  const auto ta = std::chrono::steady_clock::now();
  DecodeAttentionParams p;
  p.q = q;
  p.out = out;
  p.chunks = reinterpret_cast<const AttentionChunk*>(dev + items_bytes);
  p.chunk_offsets = reinterpret_cast<const uint32_t*>(dev + items_bytes + chunks_bytes);
  p.num_q_heads = g.num_q_heads;
  p.num_kv_heads = kv;
  p.head_dim = g.head_dim;
  p.dtype = g.dtype;
  p.scale = scale;
  const uint32_t splits = std::clamp<uint32_t>(max_per_head, 1, kMaxSplits);
  ICECACHE_RETURN_IF_ERROR(be->Attention(p, splits, L.scratch.ptr, stream));
  ICECACHE_RETURN_IF_ERROR(be->Record(L.done.get(), stream));
  L.done_recorded = true;
  if (opt.profile) ICECACHE_RETURN_IF_ERROR(be->WaitMarker(L.done.get()));
  b.attention_us = MicrosSince(ta);

  stats.cache_hits.fetch_add(b.hits);
  stats.cache_misses.fetch_add(b.misses);
  L.tokens = pos + 1;

  // 6. hand a full window page to the daemon.
  if (!L.full_kv && pos >= g.sink_tokens &&
      L.tokens - L.window_begin >= g.window_tokens) {
    absl::Status st = HandOverWindowPage(layer, stream);
    if (!st.ok()) {
      L.failed = st;
      return st;
    }
  }
  stats.decode_steps.fetch_add(1);
  b.total_us = MicrosSince(t0);
  last = b;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Drop and inspection

absl::Status Sequence::Impl::Drop() {
  if (dropped) return absl::FailedPreconditionError("the sequence was dropped already");
  dropped = true;
  absl::Status first;
  while (!pending_order.empty()) {
    absl::Status st = FinishPending(pending_order.front());
    if (first.ok() && !st.ok() && st.code() != absl::StatusCode::kUnavailable) first = st;
  }
  for (LayerState& L : layers) {
    if (L.done_recorded) (void)be->WaitMarker(L.done.get());
  }
  layers.clear();
  q_host.Reset();
  grpc::ClientContext ctx;
  (void)client->CallOptionsFor(&ctx);
  v1::DropSequenceRequest req;
  req.set_handle(handle);
  v1::DropSequenceResponse resp;
  const grpc::Status st = client->stub->DropSequence(&ctx, req, &resp);
  if (!st.ok() && first.ok()) {
    first = absl::Status(static_cast<absl::StatusCode>(st.error_code()),
                         absl::StrCat("DropSequence: ", st.error_message()));
  }
  return first;
}

absl::StatusOr<Sequence::AttendedRows> Sequence::Impl::LastAttended(uint32_t layer,
                                                                   uint32_t head) const {
  ICECACHE_RETURN_IF_ERROR(CheckUsable(layer));
  if (head >= g.num_kv_heads) return absl::InvalidArgumentError("head out of range");
  const LayerState& L = layers[layer];
  if (L.offsets.empty()) return absl::FailedPreconditionError("the layer was not decoded yet");
  if (L.done_recorded) ICECACHE_RETURN_IF_ERROR(be->WaitMarker(L.done.get()));
  AttendedRows rows;
  const size_t elems = g.head_dim;
  for (uint32_t c = L.offsets[head]; c < L.offsets[head + 1]; ++c) {
    const AttentionChunk& ch = L.chunks[c];
    const size_t at = rows.k.size();
    rows.k.resize(at + size_t{ch.count} * elems);
    rows.v.resize(at + size_t{ch.count} * elems);
    ICECACHE_RETURN_IF_ERROR(be->Copy(rows.k.data() + at, ch.k, ch.count * row_bytes, nullptr));
    ICECACHE_RETURN_IF_ERROR(be->Copy(rows.v.data() + at, ch.v, ch.count * row_bytes, nullptr));
    rows.count += ch.count;
  }
  ICECACHE_RETURN_IF_ERROR(be->Synchronize(nullptr));
  return rows;
}

// ---------------------------------------------------------------------------------------------
// Public surface

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;
ExecutionMode Client::mode() const { return impl_->backend->mode(); }
Attachment& Client::attachment() { return *impl_->attachment; }

absl::StatusOr<std::unique_ptr<Client>> Client::Attach(const ClientOptions& options) {
  if (!(options.cache_factor >= 1.0) || options.cache_factor > 64.0) {
    return absl::InvalidArgumentError("cache_factor must be within [1, 64]");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  ExecutionMode mode = options.mode;
  if (mode == ExecutionMode::kAuto) {
    mode = client_internal::CudaDeviceUsable(options.device) ? ExecutionMode::kCuda
                                                             : ExecutionMode::kCpu;
  }
  if (mode == ExecutionMode::kCuda) {
    absl::StatusOr<std::unique_ptr<Backend>> b = client_internal::CreateCudaBackend(options.device);
    if (!b.ok()) return b.status();
    impl->backend = std::move(*b);
  } else {
    impl->backend = client_internal::CreateCpuBackend(options.cpu_threads);
  }
  Attachment::Options ao;
  ao.socket = options.socket;
  ao.timeout = options.timeout;
  Impl* raw = impl.get();
  ao.on_segment_mapped = [raw](uint32_t segment, void* base, uint64_t bytes) {
    return raw->OnSegmentMapped(segment, base, bytes);
  };
  absl::StatusOr<std::unique_ptr<Attachment>> a = Attachment::Attach(ao);
  if (!a.ok()) return a.status();
  impl->attachment = std::move(*a);
  const std::string socket = options.socket.empty() ? DefaultSocketPath() : options.socket;
  impl->channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  impl->stub = v1::IceCache::NewStub(impl->channel);
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

ClientCounters Client::counters() const {
  const abi::ClientStats& s = impl_->attachment->stats();
  ClientCounters c;
  c.cache_hits = s.cache_hits.load();
  c.cache_misses = s.cache_misses.load();
  c.fetched_bytes = s.fetched_bytes.load();
  c.fetch_nanoseconds = s.fetch_nanoseconds.load();
  c.decode_steps = s.decode_steps.load();
  return c;
}

absl::StatusOr<std::unique_ptr<Sequence>> Client::CreateSequence(const SequenceOptions& o) {
  v1::CreateSequenceRequest req;
  v1::SequenceGeometry* geo = req.mutable_geometry();
  geo->set_num_layers(o.num_layers);
  geo->set_num_q_heads(o.num_q_heads);
  geo->set_num_kv_heads(o.num_kv_heads);
  geo->set_head_dim(o.head_dim);
  geo->set_dtype(o.dtype == DType::kBF16 ? v1::DTYPE_BF16 : v1::DTYPE_FP16);
  geo->set_max_tokens(o.max_tokens);
  if (o.page_size) geo->set_page_size(*o.page_size);
  if (o.budget_tokens) geo->set_budget_tokens(*o.budget_tokens);
  if (o.sink_tokens) geo->set_sink_tokens(*o.sink_tokens);
  if (o.window_tokens) geo->set_window_tokens(*o.window_tokens);
  if (o.full_kv_layers) geo->set_full_kv_layers(*o.full_kv_layers);
  req.set_label(o.label);
  if (!(o.scale >= 0) || !std::isfinite(o.scale)) {
    return absl::InvalidArgumentError("scale must be finite and >= 0");
  }
  grpc::ClientContext ctx;
  (void)impl_->CallOptionsFor(&ctx);
  v1::CreateSequenceResponse resp;
  const grpc::Status st = impl_->stub->CreateSequence(&ctx, req, &resp);
  if (!st.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
  }
  const v1::SequenceGeometry& rg = resp.sequence().geometry();
  auto s = std::make_unique<Sequence::Impl>();
  s->client = impl_.get();
  s->be = impl_->backend.get();
  s->handle = resp.sequence().handle();
  ResolvedGeometry& g = s->g;
  g.num_layers = rg.num_layers();
  g.num_q_heads = rg.num_q_heads();
  g.num_kv_heads = rg.num_kv_heads();
  g.head_dim = rg.head_dim();
  g.dtype = rg.dtype() == v1::DTYPE_FP16 ? DType::kFP16 : DType::kBF16;
  g.max_tokens = rg.max_tokens();
  g.page_size = rg.page_size();
  g.budget_tokens = rg.budget_tokens();
  g.sink_tokens = rg.sink_tokens();
  g.window_tokens = rg.window_tokens();
  g.full_kv_layers = rg.full_kv_layers();
  s->layout = PageLayout{g.page_size, g.head_dim, DTypeBytes(g.dtype)};
  s->row_bytes = s->layout.row_bytes();
  s->scale = o.scale > 0 ? o.scale : 1.0f / std::sqrt(static_cast<float>(g.head_dim));
  s->ring_capacity = g.window_tokens + g.page_size;
  s->k_sel = g.selected_pages();
  s->cache_slots = std::max<uint32_t>(
      s->k_sel, static_cast<uint32_t>(std::ceil(impl_->options.cache_factor * s->k_sel)));
  const uint32_t ceil_rows = kChunkRows;
  const uint32_t offloaded_chunks = (g.sink_tokens + ceil_rows - 1) / ceil_rows +
                                    (s->ring_capacity + ceil_rows - 1) / ceil_rows + 1 + s->k_sel;
  const uint32_t full_chunks =
      g.full_kv_layers > 0 ? static_cast<uint32_t>((g.max_tokens + ceil_rows - 1) / ceil_rows) : 0;
  s->max_chunks_per_head = std::max(offloaded_chunks, full_chunks);
  s->layers.resize(g.num_layers);
  for (uint32_t l = 0; l < g.num_layers; ++l) s->layers[l].full_kv = l < g.full_kv_layers;
  s->q_float.resize(size_t{g.num_q_heads} * g.head_dim);
  absl::Status qs = s->q_host.Allocate(s->be, size_t{g.num_q_heads} * s->row_bytes, true);
  if (!qs.ok()) return qs;  // ~Impl drops the daemon's sequence
  return std::unique_ptr<Sequence>(new Sequence(std::move(s)));
}

Sequence::Sequence(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Sequence::~Sequence() = default;
const std::string& Sequence::handle() const { return impl_->handle; }
const ResolvedGeometry& Sequence::geometry() const { return impl_->g; }
absl::Status Sequence::Prefill(uint32_t layer, const void* k, const void* v, uint32_t tokens,
                               void* stream) {
  return impl_->Prefill(layer, k, v, tokens, stream);
}
absl::Status Sequence::Decode(uint32_t layer, const void* q, const void* k_new,
                              const void* v_new, void* out, void* stream) {
  return impl_->Decode(layer, q, k_new, v_new, out, stream);
}
absl::Status Sequence::Drop() { return impl_->Drop(); }
uint64_t Sequence::tokens(uint32_t layer) const {
  return layer < impl_->layers.size() ? impl_->layers[layer].tokens : 0;
}
const DecodeBreakdown& Sequence::last_decode() const { return impl_->last; }
absl::StatusOr<Sequence::AttendedRows> Sequence::LastAttended(uint32_t layer,
                                                             uint32_t head) const {
  return impl_->LastAttended(layer, head);
}

}  // namespace icecache
