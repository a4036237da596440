// The semantic KV index of one (sequence, layer, KV head): one interface, several
// implementations (the IceCache DCI tree, the exact oracle, the Quest-style and StreamingLLM
// baselines). Domain types only; knows nothing of gRPC.
//
// The index decides the page layout (which tokens share a page, which slot each token has)
// but never owns key memory: pages live in a store (the daemon's arena, or InMemoryPages
// in tests and benchmarks). The index reads key rows through a PageReader and tells the store
// how to fill and rewrite pages through a PageWriter, under its own write lock, so a search
// never sees a page half rewritten. The index keeps only small per-token metadata.
//
// Thread safety (every implementation): Search and the const accessors may run concurrently
// with each other; Build and Insert are exclusive (a reader-writer lock per index), and the
// PageWriter is called while that lock is held.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/index/rows.h"

namespace icecache::index {

inline constexpr uint32_t kNoPage = 0xffffffffu;

// The tokens handed to Build or Insert: their post-RoPE keys (one row each) and their
// positions in the sequence (any distinct values; reported back in the layout).
struct KeyBatch {
  RowView keys;
  const uint32_t* positions = nullptr;  // [keys.rows]
  // When set and it becomes true, a Build stops early with CANCELLED (checked every few
  // hundred tokens): the daemon sets it when the client that asked for the build goes away.
  // An index whose Build was cancelled must not be used again.
  const std::atomic<bool>* cancel = nullptr;
};

// Where a slot's row comes from in a layout change.
struct SlotSource {
  enum class Kind : uint8_t { kBatch = 0, kExisting = 1 };
  Kind kind = Kind::kBatch;
  uint32_t page = kNoPage;  // kExisting: page before the change
  uint32_t slot = 0;        // kExisting: slot before the change
  uint32_t batch_row = 0;   // kBatch: row of the batch passed to Build/Insert
};

struct SlotWrite {
  uint32_t page = kNoPage;
  uint32_t slot = 0;
  SlotSource src;
};

struct PageFill {
  uint32_t page = kNoPage;
  uint32_t valid = 0;  // tokens in the page after the change (slots [0, valid) hold them)
};

// A change of the page layout. The store applies it as one parallel assignment: every
// kExisting source is read as it was before the change, then every write lands.
//   1. allocate frames for `allocated` (ids never used before, or freed earlier);
//   2. perform `writes` (K and V rows of whole tokens);
//   3. set each page's valid count from `changed` and bump its version;
//   4. release the frames of `freed`.
struct LayoutChange {
  std::vector<uint32_t> allocated;
  std::vector<SlotWrite> writes;
  std::vector<PageFill> changed;  // every page whose content or count changed, allocated too
  std::vector<uint32_t> freed;
};

// Read access to the key rows of an index's pages.
class PageReader {
 public:
  virtual ~PageReader() = default;
  // Start of `page`'s K half: page_size rows of the index's dim and elem type, dense.
  virtual const void* PageKeys(uint32_t page) const = 0;
};

// Applies layout changes to the store (and the batch's V rows, which the store knows).
class PageWriter {
 public:
  virtual ~PageWriter() = default;
  virtual void Apply(const LayoutChange& change) = 0;
};

// One page of a search result.
struct SelectedPage {
  uint32_t page = kNoPage;
  uint32_t valid = 0;  // tokens in the page
  float score = 0;     // the implementation's ranking score (higher is better)
};

// The layout as the store and the quality tools see it.
struct PageInfo {
  uint32_t page = kNoPage;
  std::vector<uint32_t> positions;  // positions of the tokens in slots 0..valid-1
};

// Geometry every implementation is created with.
struct IndexGeometry {
  uint32_t dim = 0;
  ElemType elem_type = ElemType::kBF16;
  uint32_t page_size = 16;
};

class KvIndex {
 public:
  virtual ~KvIndex() = default;

  virtual const char* name() const = 0;
  virtual const IndexGeometry& geometry() const = 0;

  // Indexes the first batch (the prompt's offloaded tokens): decides the layout and fills
  // every page through `writer`.
  // INVALID_ARGUMENT: empty batch, wrong dim or elem type, null positions, non-finite keys.
  // FAILED_PRECONDITION: already built. On error nothing changes.
  virtual absl::Status Build(const KeyBatch& batch, PageWriter* writer) = 0;

  // Adds tokens (one full window page during decode) to a built index; pages it touches are
  // reported in the change passed to `writer`.
  // INVALID_ARGUMENT as for Build; FAILED_PRECONDITION before Build. On error nothing changes.
  virtual absl::Status Insert(const KeyBatch& batch, PageWriter* writer) = 0;

  // The best k pages for the queries of one GQA group (`group` rows of dim fp32, row-major),
  // best first. Each query head ranks pages on its own; the lists are merged
  // rank-interleaved (q0 r0, q1 r0, ..., q0 r1, ...), duplicates dropped, cut to k.
  // INVALID_ARGUMENT: k == 0, k above the number of pages, group == 0, null or non-finite
  // queries. FAILED_PRECONDITION before Build.
  virtual absl::Status Search(const float* queries, uint32_t group, uint32_t k,
                              std::vector<SelectedPage>* out) const = 0;

  // Upper bounds of the pages a Build of `tokens` tokens, or an Insert of `tokens` tokens,
  // can allocate (the store reserves frames for them before calling, so that running out of
  // memory fails cleanly before the layout changes).
  virtual uint64_t MaxBuildPages(uint64_t tokens) const = 0;
  virtual uint64_t MaxInsertPages(uint64_t tokens) const = 0;

  virtual uint32_t num_tokens() const = 0;
  virtual uint32_t num_pages() const = 0;
  // Upper bound (exclusive) of page ids in use; ids below it may be free.
  virtual uint32_t page_id_limit() const = 0;
  // Every live page with its tokens' positions in slot order.
  virtual std::vector<PageInfo> Layout() const = 0;
  // Heap bytes of the index's own metadata (not the pages).
  virtual uint64_t MemoryBytes() const = 0;
};

// Shared validation of the inputs above; the messages name the offending row.
absl::Status ValidateBatch(const IndexGeometry& geometry, const KeyBatch& batch);
absl::Status ValidateQueries(const IndexGeometry& geometry, const float* queries, uint32_t group);

// The k best of `all` by score (ties: lower page id first), best first.
std::vector<SelectedPage> TopPages(std::vector<SelectedPage> all, uint32_t k);

// Merges per-query ranked lists: rank-interleaved, first occurrence kept, cut to k.
std::vector<SelectedPage> MergeRankInterleaved(const std::vector<std::vector<SelectedPage>>& lists,
                                               uint32_t k);

}  // namespace icecache::index
