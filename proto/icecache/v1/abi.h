// IceCache shared-memory ABI, version 2: the one definition of everything a client process and
// icecached exchange outside gRPC. Plain C++ (no nvcc, no protobuf), fixed-size little-endian
// fields, every struct's size pinned by static_assert so that both sides agree byte for byte.
//
// Overview
//   Attach. A client connects to the daemon's attach socket (a unix stream socket next to the
//   control socket). The daemon reads the peer's credentials (SO_PEERCRED), checks its uid
//   against the allowlist, creates the client's arena and answers with an AttachReply and,
//   as SCM_RIGHTS ancillary data, the file descriptors of the arena's control segment and of
//   the request doorbell (an eventfd). The connection stays open for the client's lifetime:
//   when it closes (detach, exit, crash, SIGKILL) the daemon frees the client's sequences
//   and arena. Later the daemon sends a SegmentNotice (with the segment's memfd) on the same
//   connection whenever it adds a data segment to the arena.
//
//   Arena. memfd-backed segments, never named in /dev/shm. Segment 0 is the control segment:
//   ArenaHeader, the submission queue, the slots, and the client's stats block. Data
//   segments hold KV pages (frames of one page size each) and staging buffers. Addresses are
//   (segment, byte offset); a page's rows are addressed through kernels/page_layout.h.
//
//   Requests. The client owns num_slots slots. To issue a request it fills a free slot
//   (header + payload), sets its state to kSubmitted, appends the slot index to the
//   submission queue and rings the doorbell (write(eventfd, 1)). The daemon copies the
//   request out of shared memory before it validates it (the client may scribble on it
//   meanwhile), runs it, writes the response into the same slot and sets the state to kDone
//   with a futex wake on the state word. Requests complete out of order (prefill is
//   asynchronous); the client waits on the slot it cares about.
//
//   Trust. Every byte in the arena is written by the client and untrusted by the daemon:
//   slot indices, states, ops, handles, layers, counts, offsets and sizes are checked before
//   use, and a bad request gets an error status in its slot (or, when the slot itself is
//   unusable, is dropped and counted) while the daemon and every other client carry on.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace icecache::abi {

inline constexpr uint32_t kAbiVersion = 3;  // 2: frame tags in page segments; 3: select tails
inline constexpr uint64_t kArenaMagic = 0x314E45524143'4349ull;  // "ICCAREN1" little-endian

// ---------------------------------------------------------------------------------- attach
// First message on the attach connection, client -> daemon (32 bytes).
struct AttachRequest {
  uint64_t magic;        // kArenaMagic
  uint32_t abi_version;  // kAbiVersion; the daemon refuses others
  uint32_t flags;        // AttachFlags
  uint64_t reserved[2];  // 0
};

enum AttachFlags : uint32_t {
  // An operator attachment (the `icecache` CLI): no arena, but its token sees and drops every
  // client's sequences. Granted only to uids in the daemon's operator allowlist.
  kAttachOperator = 1u << 0,
  // Recovery after the daemon went away (crash, restart, upgrade): the request carries, as
  // SCM_RIGHTS on its first byte, the descriptors of the client's previous arena in segment
  // order (control segment first; reserved[0] = how many, at most kMaxDonatedSegments). The
  // client gets a new arena as in any attach; the daemon maps the old segments read-only and
  // serves RestoreSequence from the pages and frame tags it finds there (it trusts nothing in
  // them: every tag and row is checked and copied before use). The old segments are let go
  // when the client sets RestoreSequenceRequest.last or detaches.
  kAttachRecover = 1u << 1,
  // The client registers (pins) the arena's segments with a device (cudaHostRegister). A
  // pinned page stays with the device when the file's memory is freed under it (a punched
  // range of a memfd orphans its pinned pages: the device would go on reading the old frames
  // and the daemon would not see what the device writes), so the daemon never gives such a
  // client's segments back: what its arena holds beyond its sequences' promises stays held,
  // and charged, until it detaches (its free frames and staging ranges are reused meanwhile).
  kAttachPinsSegments = 1u << 2,
};
inline constexpr uint32_t kMaxDonatedSegments = 250;  // below SCM_MAX_FD (253)
static_assert(sizeof(AttachRequest) == 32);

enum AttachStatus : uint32_t {
  kAttachOk = 0,
  kAttachDenied = 1,      // uid not in the allowlist
  kAttachBadVersion = 2,  // ABI version mismatch
  kAttachExhausted = 3,   // no memory for the control segment, or too many clients
  kAttachBadRequest = 4,  // malformed AttachRequest
};

// The daemon's answer. With kAttachOk it carries two descriptors (SCM_RIGHTS): the control
// segment's memfd, then the request doorbell's eventfd.
struct AttachReply {
  uint64_t magic;          // kArenaMagic
  uint32_t abi_version;    // the daemon's
  uint32_t status;         // AttachStatus
  uint64_t client_id;      // daemon-wide id of this attachment (for logs and metrics)
  char token[32];          // kTokenChars lowercase hex characters (not NUL-terminated)
  uint64_t control_bytes;  // size of the control segment to map
  char message[128];       // NUL-terminated reason when status != kAttachOk
};
static_assert(sizeof(AttachReply) == 192);

// The attachment token: 32 lowercase hex characters (128 random bits), sent by the client in
// the "icecache-client-token" gRPC metadata so that control calls act for this client.
inline constexpr size_t kTokenChars = 32;
inline constexpr const char* kTokenMetadataKey = "icecache-client-token";

// Daemon -> client, on the attach connection, with the segment's memfd (SCM_RIGHTS).
struct SegmentNotice {
  uint64_t magic;    // kArenaMagic
  uint32_t segment;  // index (1..kMaxSegments-1)
  uint32_t reserved;
  uint64_t bytes;  // size to map
};
static_assert(sizeof(SegmentNotice) == 24);

// ---------------------------------------------------------------------------------- arena
inline constexpr uint32_t kMaxSegments = 256;
// The segments a daemon gives one client, control segment included: no more than a recovery
// attach can hand back (kMaxDonatedSegments), so that a restore always sees every frame.
inline constexpr uint32_t kMaxArenaSegments = kMaxDonatedSegments;
static_assert(kMaxArenaSegments <= kMaxSegments);
inline constexpr uint32_t kControlSegment = 0;

enum SegmentKind : uint32_t { kSegmentUnused = 0, kSegmentPages = 1, kSegmentStaging = 2 };

// Published by the daemon in the arena header (the client learns sizes and kinds here; the
// descriptors come as SegmentNotices).
struct SegmentInfo {
  uint64_t bytes;       // 0 when unused
  uint32_t kind;        // SegmentKind
  uint32_t page_bytes;  // kSegmentPages: bytes of each frame (K then V, page_layout.h)
};
static_assert(sizeof(SegmentInfo) == 16);

// Frame tags. A page segment of `bytes` holds FramesInPageSegment(bytes, page_bytes) frames
// from offset 0, then one FrameTag per frame (at TagOffset). The daemon writes a frame's tag
// after its rows, the owner last (release), and clears the owner before it rewrites or frees
// the frame; a page whose content changes moves to a fresh frame (copy on write) and the old
// frame is freed only after the new one is tagged. So at every instant each token the daemon
// acknowledged is in some frame whose tag names it: what a daemon restarted after a crash
// needs to rebuild the sequence (the owner is the sequence's durable id: the first 16 hex
// digits of its handle). Clients need not read tags.
inline constexpr uint32_t kMaxTagSlots = 32;  // the largest page size
struct FrameTag {
  std::atomic<uint64_t> owner;  // durable id of the owning sequence; 0: the frame holds nothing
  uint32_t layer;
  uint32_t kv_head;
  uint32_t count;  // tokens in slots [0, count)
  uint32_t reserved;
  uint32_t positions[kMaxTagSlots];  // sequence positions of slots [0, count)
};
static_assert(sizeof(FrameTag) == 152);
inline constexpr uint64_t FrameFootprint(uint64_t page_bytes) {
  return page_bytes + sizeof(FrameTag);
}
inline constexpr uint32_t FramesInPageSegment(uint64_t bytes, uint64_t page_bytes) {
  return page_bytes == 0 ? 0 : static_cast<uint32_t>(bytes / FrameFootprint(page_bytes));
}
inline constexpr uint64_t TagOffset(uint64_t bytes, uint64_t page_bytes, uint32_t frame) {
  return uint64_t{FramesInPageSegment(bytes, page_bytes)} * page_bytes +
         uint64_t{frame} * sizeof(FrameTag);
}

// A location in the arena.
struct ArenaRef {
  uint32_t segment;
  uint32_t reserved;
  uint64_t offset;  // bytes from the segment's start
};
static_assert(sizeof(ArenaRef) == 16);

// Counters the client publishes for the daemon to export (monotonic; the client adds).
struct alignas(64) ClientStats {
  std::atomic<uint64_t> cache_hits;            // selected pages already resident on the GPU
  std::atomic<uint64_t> cache_misses;          // selected pages fetched
  std::atomic<uint64_t> fetched_bytes;         // bytes moved host -> GPU by the gather
  std::atomic<uint64_t> fetch_nanoseconds;     // time spent in those transfers
  std::atomic<uint64_t> decode_steps;          // Decode calls completed
  std::atomic<uint64_t> prefetched_selects;    // layer steps served by a one-step-ahead select
  std::atomic<uint64_t> drift_fallback_heads;  // KV heads searched again: their query moved
  std::atomic<uint64_t> reserved[1];
};
static_assert(sizeof(ClientStats) == 64);

enum SlotState : uint32_t {
  kSlotFree = 0,       // owned by the client
  kSlotSubmitted = 1,  // client -> daemon: a request is ready (and its index is in the SQ)
  kSlotRunning = 2,    // daemon has taken it
  kSlotDone = 3,       // daemon -> client: the response is ready
};

enum Op : uint32_t {
  kOpNop = 0,          // answers kOk at once (for round-trip measurements)
  kOpStage = 1,        // allocate a staging buffer for `tokens` tokens of the sequence
  kOpPrefill = 2,      // build `layer`'s index from a staging buffer holding the prompt's K/V;
                       // the buffer is consumed when it succeeds and left alone when refused
  kOpAppend = 3,       // insert a staging buffer's page of new tokens into `layer` (likewise).
                       // Pages of the layer may change while it runs: do not read the layer's
                       // pages between submitting an append and its completion. Appends of one
                       // (sequence, layer) run in submission order.
  kOpSelect = 4,       // best pages per KV head for the queries in the payload. A select runs
                       // after every append of its (sequence, layer) submitted before it, so its
                       // pages include them and no append it follows is still changing them.
  kOpRelease = 5,      // free a staging buffer that was not consumed (or a scratch buffer);
                       // FAILED_PRECONDITION while a request in flight uses it (a prefill,
                       // append or batch select holds its buffer until its answer)
  kOpScratch = 6,      // a scratch buffer of the client's own (a staging allocation of no
                       // sequence) of the uint64 byte count in the payload; answers a
                       // StageResponse (v_offset 0); freed by kOpRelease
  kOpSelectBatch = 7,  // the selects of several sequences for one layer: `tokens`
                       // BatchSelectEntry at the start of the scratch buffer `staging` (from
                       // kOpScratch; one request per buffer at a time, as for staging), each
                       // entry's queries and results in the same buffer. The slot's status is
                       // the request's own; each entry answers with its own status. An
                       // entry's search runs after every append of its (sequence, layer)
                       // submitted before the request.
};

inline constexpr uint32_t kNumOps = kOpSelectBatch + 1;

// Lower-case name of an op (for logs and metric labels); "unknown" outside the enum.
inline const char* OpName(uint32_t op) {
  switch (op) {
    case kOpNop:
      return "nop";
    case kOpStage:
      return "stage";
    case kOpPrefill:
      return "prefill";
    case kOpAppend:
      return "append";
    case kOpSelect:
      return "select";
    case kOpRelease:
      return "release";
    case kOpScratch:
      return "scratch";
    case kOpSelectBatch:
      return "select_batch";
  }
  return "unknown";
}

// Status codes in a slot: google.rpc.Code numbers (0 OK, 3 INVALID_ARGUMENT, 5 NOT_FOUND,
// 8 RESOURCE_EXHAUSTED, 9 FAILED_PRECONDITION, 13 INTERNAL, 14 UNAVAILABLE, 16
// UNAUTHENTICATED), as in the control API.

inline constexpr size_t kHandleChars = 36;  // "seq_" + 32 hex digits

// The fixed header of a slot. Request fields are written by the client; response fields by
// the daemon. 256 bytes; the payload follows.
struct alignas(64) SlotHeader {
  std::atomic<uint32_t> state;  // SlotState; futex word for completion
  uint32_t op;                  // Op
  uint64_t request_id;          // client's, echoed back
  char handle[40];              // sequence handle, NUL padded (kHandleChars used)
  uint32_t layer;               // layer index
  uint32_t tokens;              // kOpStage: tokens to stage; kOpPrefill/kOpAppend: tokens in
                                // the staging buffer to consume
  uint32_t k;                   // kOpSelect: pages per KV head
  uint32_t query_dtype;         // kOpSelect: 0 fp32 (the only value in v1)
  ArenaRef staging;             // kOpPrefill/kOpAppend/kOpRelease: the buffer (from kOpStage)
  uint32_t payload_bytes;       // request: bytes of payload the client wrote
  uint32_t first_position;      // kOpPrefill/kOpAppend: sequence position of the first token
  uint32_t select_flags;        // kOpSelect: SelectFlags
  // ---- response (daemon)
  uint32_t status;          // google.rpc.Code
  uint32_t response_bytes;  // bytes of payload the daemon wrote
  char message[96];         // NUL-terminated error text when status != 0
  uint8_t reserved1[36];
};
static_assert(sizeof(SlotHeader) == 256);

// kOpStage response payload: where to write, and the layout of the buffer:
//   K rows [num_kv_heads][tokens][head_dim] of the sequence's dtype, then V rows alike.
struct StageResponse {
  ArenaRef buffer;
  uint64_t bytes;
  uint64_t v_offset;  // bytes from buffer start to the V rows
};
static_assert(sizeof(StageResponse) == 32);

enum SelectFlags : uint32_t {
  // The payload carries, after the queries, one byte per KV head (1: search this head). Heads
  // not searched get only unused entries in the response.
  kSelectHeadMask = 1,
};

// kOpSelect request payload: float32 queries [num_q_heads][head_dim], post-RoPE (then the head
// mask, [num_kv_heads] bytes, with kSelectHeadMask).
// kOpSelect response payload: for each KV head h, `k` entries (fewer when the layer holds
// fewer pages; unused entries have segment = 0xffffffff), best first.
struct SelectedPageRef {
  uint32_t segment;  // data segment of the page's frame
  uint32_t frame;    // frame index in that segment: byte offset = frame * page_bytes
  uint32_t valid;    // tokens in the page (slots [0, valid))
  uint32_t version;  // bumped each time the frame's content changes; resident copies at
                     // another version are stale
};
static_assert(sizeof(SelectedPageRef) == 16);
inline constexpr uint32_t kNoSegment = 0xffffffffu;

// Tail estimate (a sequence whose geometry's tail_estimate is MEAN or MEAN_VAR): the kOpSelect
// response payload continues, right after the [num_kv_heads][k] SelectedPageRef entries, with
// one tail partial per query head, [num_q_heads][2 + head_dim] float32:
//   max, sum, acc[head_dim]
// the softmax partial of the estimated unselected pages of that head's KV head: every page of
// the layer's index not among the entries returned for it counts as one virtual token
// (selection/tail.h) of logit s_p and value mean_value_p, with max = max_p s_p,
// sum = sum_p exp(s_p - max) and acc = sum_p exp(s_p - max) mean_value_p. Logits are in the
// units of the attention's softmax (scaled by the sequence's softmax_scale). sum == 0: nothing
// to add (a masked KV head, every page selected, an empty index). The attention merges it with
// its own partial over what it fetched: out = (acc_f e^(m_f - M) + acc e^(max - M)) /
// (sum_f e^(m_f - M) + sum e^(max - M)), M = max(m_f, max).
// kOpSelectBatch: the same tail partials follow each entry's result_k entries per KV head
// inside [result_offset, result_offset + result_bytes) (the room must hold both, else that
// entry's status is INVALID_ARGUMENT).
inline constexpr uint64_t TailPartialFloats(uint32_t head_dim) { return 2 + uint64_t{head_dim}; }
inline constexpr uint64_t TailBytes(uint32_t num_q_heads, uint32_t head_dim) {
  return uint64_t{num_q_heads} * TailPartialFloats(head_dim) * sizeof(float);
}

// One sequence's select in a kOpSelectBatch request. Offsets are bytes from the start of the
// scratch buffer; the daemon reads the request fields once and checks every range against the
// buffer before use.
struct BatchSelectEntry {
  char handle[40];         // sequence handle, NUL padded
  uint32_t k;              // pages per KV head (0: the sequence's selected pages)
  uint32_t select_flags;   // SelectFlags
  uint64_t query_offset;   // fp32 [num_q_heads][head_dim] (then the head mask)
  uint64_t query_bytes;    // must be exactly the queries (and mask)
  uint64_t result_offset;  // [num_kv_heads][k] SelectedPageRef, written by the daemon
  uint64_t result_bytes;   // room at result_offset
  // ---- response (daemon)
  uint32_t status;    // google.rpc.Code of this entry
  uint32_t result_k;  // entries per KV head written (k)
  char message[40];   // NUL-terminated error text when status != 0
};
static_assert(sizeof(BatchSelectEntry) == 128);
inline constexpr uint32_t kMaxBatchSelect = 1024;

// The control segment starts with this header; offsets are from the segment's start.
struct alignas(64) ArenaHeader {
  uint64_t magic;         // kArenaMagic
  uint32_t abi_version;   // kAbiVersion
  uint32_t header_bytes;  // sizeof(ArenaHeader)
  uint64_t client_id;
  uint32_t num_slots;      // power of two
  uint32_t slot_bytes;     // sizeof(SlotHeader) + payload capacity
  uint64_t slots_offset;   // slot i at slots_offset + i * slot_bytes
  uint64_t sq_offset;      // uint32_t[num_slots] ring of slot indices
  uint64_t control_bytes;  // size of this segment
  uint8_t reserved0[8];

  // Submission queue: the client writes entries and advances sq_tail (release); the daemon
  // reads up to sq_tail and advances sq_head.
  alignas(64) std::atomic<uint32_t> sq_head;
  // Set by the daemon before it blocks on the doorbell; while it is 1 the client rings the
  // doorbell after advancing sq_tail (otherwise the daemon is polling and sees the entry).
  std::atomic<uint32_t> daemon_sleeping;
  alignas(64) std::atomic<uint32_t> sq_tail;

  // Segment table, written by the daemon before it sends the SegmentNotice.
  alignas(64) std::atomic<uint32_t> num_segments;
  uint32_t reserved1[15];
  SegmentInfo segments[kMaxSegments];

  ClientStats stats;
};

inline constexpr uint32_t kDefaultSlots = 64;
inline constexpr uint32_t kDefaultSlotPayload = 64 * 1024;

inline SlotHeader* SlotAt(void* control, uint32_t i) {
  auto* h = static_cast<ArenaHeader*>(control);
  return reinterpret_cast<SlotHeader*>(static_cast<uint8_t*>(control) + h->slots_offset +
                                       uint64_t{i} * h->slot_bytes);
}
inline uint8_t* SlotPayload(SlotHeader* slot) {
  return reinterpret_cast<uint8_t*>(slot) + sizeof(SlotHeader);
}
inline std::atomic<uint32_t>* SubmissionQueue(void* control) {
  auto* h = static_cast<ArenaHeader*>(control);
  return reinterpret_cast<std::atomic<uint32_t>*>(static_cast<uint8_t*>(control) + h->sq_offset);
}

// Bytes of the control segment for `slots` slots of `payload` bytes.
inline constexpr uint64_t ControlBytes(uint32_t slots, uint32_t payload) {
  const uint64_t header = (sizeof(ArenaHeader) + 63) / 64 * 64;
  const uint64_t sq = (uint64_t{slots} * 4 + 63) / 64 * 64;
  return header + sq + uint64_t{slots} * (sizeof(SlotHeader) + payload);
}

static_assert(std::atomic<uint32_t>::is_always_lock_free);
static_assert(std::atomic<uint64_t>::is_always_lock_free);

}  // namespace icecache::abi
