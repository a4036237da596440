// The IceCache DCI tree of one (sequence, layer, KV head), faithful to the paper first
// (../shared/reference/icecache-method.md section 3); every parameter is an option whose
// default is the paper's value, and improvements are options measured side by side.
//
// Structure
//   - Maximum-inner-product search becomes nearest-neighbour search through the lift
//     T(k) = [k, sqrt(M - |k|^2)] (keys) and T(q) = [q/|q|, 0] (queries). Scores are exact
//     inner products q.k; key-to-key closeness (parent assignment) is T(k1).T(k2).
//   - Every token sits on exactly one level. Promotion is deterministic in token order:
//     token i reaches level >= 1 when floor(c0 * r1) steps up (c0 = tokens so far), a
//     level->=l token reaches >= l+1 when floor(c_l * r2) steps up; so about r1 of all tokens
//     are on level >= 1 and r2 of each level >= 1 on the next, evenly spread in position.
//   - Each token's parent is its nearest token on the level above (exact while that level
//     has at most exact_parent_max tokens; a DCI descent beyond). The children of one parent
//     form a cell; the top level is the root cell.
//   - A cell keeps its tokens sorted by their projection onto one random direction u of
//     dim+1 (the lifted space), with the norm bound M_c tracked per cell; when a token raises
//     M_c the cell is re-projected. Pages are runs of at most page_size consecutive tokens of
//     one cell: pages are semantic clusters, not positions.
//   - Search descends from the root with a field of view max(fov_ratio * n, min_fov): in each
//     expanded cell it scores exactly the retrieve_ratio share of tokens closest to the query
//     in projection, keeps the best FOV tokens as the next beam, and ranks pages by the best
//     token scored in them over all levels. The GQA group's lists merge rank-interleaved.
//   - Insert places each new token under its nearest parent (splitting a full page in two),
//     lets a newly promoted token adopt the nearby tokens it is closer to than their parent,
//     and reports every page it touched.
//
//   - Options add a best-first search over cells by an upper bound (exact, or with 1-bit
//     sketches and exact rescoring) and a beam-descent parent search that builds in
//     O(n log n); see DciOptions::search_mode and parent_beam.
//
// Memory: about 22 bytes of metadata per token (position, level, page, slot, |k|^2, and the
// cell's sorted projection and token id), no copy of the keys; the best-first modes add a
// bf16 reference point and a radius per cell (about 1 in 80 tokens), and kBestFirstSketch a
// 1-bit sketch per key (dim / 8 + 4 bytes).
//
// Thread safety: see KvIndex. Searches share a reader lock; Build and Insert take the
// writer lock for their whole duration (metadata update and page rewrites), so a search
// sees either the layout before an insert or after it, never a mix.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "server/index/kv_index.h"

namespace icecache::index {

struct DciOptions {
  // Share of tokens promoted from level 0 to level >= 1 (paper: 0.01).
  double promotion_ratio_1 = 0.01;
  // Share of level->=l tokens promoted to level >= l+1, for l >= 1 (paper: 0.2).
  double promotion_ratio_2 = 0.2;
  // Parent assignment scores every candidate while the level above holds at most this many
  // tokens (paper: 3000); beyond, it descends the tree.
  uint32_t exact_parent_max = 3000;
  // Query field of view: max(ceil(fov_ratio * tokens), min_fov) (paper: 0.0015, 30).
  double fov_ratio = 0.0015;
  uint32_t min_fov = 30;
  // Share of each expanded cell scored exactly by a query, closest in projection first
  // (paper: prop_to_retrieve 0.8).
  double query_retrieve_ratio = 0.8;
  // The paper's anchor shortcut for builds whose lower level exceeds exact_parent_max: every
  // anchor_interval-th token gets a full parent search, the others try the parents of the
  // anchor_window anchors on each side and keep the closest when within anchor_slack of its
  // farthest anchor child. 0 = off (every parent from the full search, as the issue asks);
  // the paper's prefill uses 60, 60, 1.02.
  uint32_t anchor_interval = 0;
  uint32_t anchor_window = 60;
  float anchor_slack = 1.02f;
  // Parent search by descent, at build and at insert (paper: FOV 30 with ratio 1.0 at
  // prefill, FOV 20 with ratio 0.6 at insert).
  uint32_t build_fov = 30;
  double build_retrieve_ratio = 1.0;
  uint32_t insert_fov = 20;
  double insert_retrieve_ratio = 0.6;
  // A token promoted to level >= 1 during insert adopts the children of its nearest
  // `reparent_neighbors` same-level tokens that are closer to it (0 turns this off).
  uint32_t reparent_neighbors = 4;
  // ---- Improvements, each off by default (= the paper) and measured side by side.
  // Project a query at the radius of the cell's keys, sqrt(M_c) * u.q/|q|, instead of at
  // radius 1, so that "closest in projection" compares points on the same sphere.
  bool scale_query_projection = false;
  // One descent for the whole GQA group: every key visited is scored for all the group's
  // queries (one read of the row), and the beams are the union of the queries' beams.
  bool joint_group_search = false;
  // Score expanded cells in whole pages (the pages closest to the query in projection, until
  // the retrieve share is covered): sequential reads of page memory, exact page statistics.
  bool page_granular_scoring = false;
  // How a page is ranked for one query: by its best scored token (paper) or by the softmax
  // mass of its scored tokens.
  enum class PageScore : uint8_t { kBestToken, kSoftmaxMass };
  PageScore page_score = PageScore::kBestToken;
  // How the group's lists combine: rank-interleaved (paper), or by the sum over the queries
  // of each page's share of the query's softmax mass.
  enum class GroupMerge : uint8_t { kRankInterleaved, kSumOfMass };
  GroupMerge group_merge = GroupMerge::kRankInterleaved;
  // Beam width when choosing which level-0 cells to expand (the expensive step: a level-0
  // cell holds about 1/promotion_ratio_1 keys). 0 = the field of view above (paper).
  uint32_t final_fov = 0;
  // Trees of at most this many tokens are searched exactly (every page scored for the whole
  // group in one pass): below a few thousand tokens a scan is both cheaper and exact.
  // 0 = never (paper).
  uint32_t exact_search_max_tokens = 0;
  // ---- The best-first search and the n log n build (this project's; off by default).
  // How a search finds its pages:
  //   kBeamDescent      the paper's beam descent (with the options above);
  //   kBestFirstExact   every cell (the children of one parent) has a reference point r (the
  //                     mean of its keys) and a radius R (its farthest key from r), so
  //                     q.r + |q| R bounds the score of every key in it. Each query opens
  //                     cells best bound first, scoring their pages exactly (sequential page
  //                     reads, one pass for the group), until no unopened cell's bound
  //                     reaches its k-th best page. With cell_bound_slack 1 the bound is valid
  //                     and the result is the exact scan's pages (same ranking: best key per
  //                     page, per query, merged rank-interleaved).
  //   kBestFirstSketch  the same order, but an opened cell's keys are only estimated, from a
  //                     1-bit sketch of their residual to r (sketch.h, 20 bytes per key at dim
  //                     128); each query opens cells until no unopened bound reaches its
  //                     rescore_tokens-th best estimate (as of its candidates' last cut,
  //                     which may open a few cells more), then those best estimates (the union
  //                     over the group) are rescored exactly and pages ranked by their best
  //                     rescored key. Approximate: the estimate can miss a best key.
  // The best-first modes rank pages by best key, then optionally re-rank the best ones by mass
  // (rerank_extra_pages); page_score, group_merge, joint_group_search, page_granular_scoring
  // and final_fov apply to kBeamDescent only.
  enum class SearchMode : uint8_t { kBeamDescent, kBestFirstExact, kBestFirstSketch };
  SearchMode search_mode = SearchMode::kBeamDescent;
  // The bound of a cell is q.r + cell_bound_slack * |q| * R: 1 is a valid upper bound; below 1
  // an estimate of the best key that opens fewer cells (the Cauchy-Schwarz term assumes the
  // worst alignment, which high-dimensional residuals almost never reach).
  float cell_bound_slack = 1.0f;
  // kBestFirstSketch: keys per query rescored exactly (the best estimates), at least: a search
  // for k pages rescores max(rescore_tokens, k + rerank_extra_pages) per query, since only
  // pages holding a rescored key can be ranked and each key nominates one page (with fewer,
  // large k would be filled with unranked pages).
  uint32_t rescore_tokens = 64;
  // Best-first modes: the best k + rerank_extra_pages pages of the search (best key per page,
  // merged rank-interleaved) are scored whole for the group and the k returned are those of
  // the largest group softmax mass: per query, each candidate's share of the softmax mass of
  // every key in the candidates (scale 1/sqrt(dim)), summed over the group. A page with many
  // warm keys then beats a page with one hot key, as the attention weighs them. 0 = off (best
  // key, the exact scan's ranking).
  uint32_t rerank_extra_pages = 0;
  // Parent search at build and insert: a beam of this width descends through the levels above
  // (every child of the beam's tokens scored exactly), so a build costs O(n log n) dot
  // products instead of O(n^2 r1) for the exact search; levels of at most 64 tokens are still
  // searched exactly. 0 = the paper's (exact up to exact_parent_max, FOV descent beyond).
  uint32_t parent_beam = 0;
  // With parent_beam, the beam of an insert's parent (and neighbour) search; 0 = parent_beam.
  // An insert places 16 tokens per decode step, where a wider beam costs little; the build
  // places the whole prompt at once.
  uint32_t insert_beam = 0;
  // Insert: a cell re-projects (re-sorts, re-chunks and re-centres every member) when a new
  // member's squared norm exceeds the bound its projections were computed with (M_c) times
  // this factor. Below that the member is placed with its lifted coordinate clamped to 0 and
  // M_c stays; the re-projection that follows takes the largest norm of all members. At least
  // 1; 1 = at every new largest norm (the paper).
  float reproject_growth = 1.0f;
  // How a cell's tokens are ordered, pages being runs of page_size consecutive tokens:
  //   kProjection  by their projection onto one random direction (the paper): a page is a
  //                slice of its cell along that direction.
  //   kClustered   by recursive splits of the cell at the median of its first principal
  //                component, each split on a page boundary, down to single pages (a balanced
  //                PCA tree per cell): a page holds keys close in every direction the cell varies
  //                most. An inserted token joins the page of its nearest cell member (splitting
  //                a full page in two). Applies only where nothing reads the projection order:
  //                the best-first search modes with parent_beam > 0 and no page-granular
  //                scoring; with any other options the order stays kProjection.
  enum class PageOrder : uint8_t { kProjection, kClustered };
  PageOrder page_order = PageOrder::kProjection;
  // Seed of the projection direction (shared by every tree built with these options).
  uint64_t seed = 0x1CECAC4E;
};

class DciTree final : public KvIndex {
 public:
  // `reader` gives access to the pages this tree lays out; it must outlive the tree.
  DciTree(const IndexGeometry& geometry, const DciOptions& options, const PageReader* reader);
  ~DciTree() override;

  const char* name() const override { return "icecache-dci"; }
  const IndexGeometry& geometry() const override { return geometry_; }
  absl::Status Build(const KeyBatch& batch, PageWriter* writer) override;
  absl::Status Insert(const KeyBatch& batch, PageWriter* writer) override;
  absl::Status Search(const float* queries, uint32_t group, uint32_t k,
                      std::vector<SelectedPage>* out) const override;
  // One page per page_size tokens, plus one per cell (cells <= upper-level tokens + 1), plus
  // one per level for rounding.
  uint64_t MaxBuildPages(uint64_t tokens) const override;
  // A split per token, a re-projected cell growing by one page, and a new cell per promoted
  // token.
  uint64_t MaxInsertPages(uint64_t tokens) const override { return 2 * tokens + 4; }
  uint32_t num_tokens() const override;
  uint32_t num_pages() const override;
  uint32_t page_id_limit() const override;
  std::vector<PageInfo> Layout() const override;
  uint64_t MemoryBytes() const override;

  // Introspection for tests and benchmarks.
  struct Stats {
    uint32_t levels = 0;                     // top level + 1
    std::vector<uint32_t> tokens_per_level;  // [level]
    uint32_t cells = 0;
    uint32_t pages = 0;
    uint64_t tokens_scored_last_search =
        0;  // (key, query) dot products of the last Search on this thread
    uint64_t tokens_sketched_last_search = 0;  // (key, query) sketch estimates, same search
    uint32_t cells_opened_last_search = 0;     // cells opened by a best-first search
  };
  Stats GetStats() const;
  // Level, parent (kNoParent for the top level) and page/slot of token `t` (insertion
  // order: batch rows of Build first, then of each Insert).
  static constexpr uint32_t kNoParent = 0xffffffffu;
  uint32_t LevelOf(uint32_t t) const;
  uint32_t ParentOf(uint32_t t) const;
  std::pair<uint32_t, uint32_t> LocationOf(uint32_t t) const;
  // Checks every structural invariant (each token in exactly one slot, slots compact, cells
  // sorted, pages within capacity, parents one level up); returns INTERNAL naming the first
  // violation. Tests call it after builds and inserts.
  absl::Status CheckInvariants() const;

 private:
  struct Cell;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  IndexGeometry geometry_;
  mutable absl::Mutex mu_;
};

}  // namespace icecache::index
