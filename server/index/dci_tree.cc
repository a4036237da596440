#include "server/index/dci_tree.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "common/log.h"
#include "server/index/simd.h"
#include "server/index/sketch.h"

namespace icecache::index {
namespace {

constexpr uint32_t kNone = 0xffffffffu;
constexpr int kMaxLevels = 24;
// Ratios as exact fractions over 10^6 (0.01 must promote exactly every 100th token).
constexpr uint64_t kRatioDen = 1'000'000;

struct Cand {
  float score;
  uint32_t tok;
};

inline bool ByScoreDesc(const Cand& a, const Cand& b) {
  return a.score > b.score || (a.score == b.score && a.tok < b.tok);
}

uint64_t RatioNumerator(double r) {
  return static_cast<uint64_t>(std::llround(std::clamp(r, 0.0, 1.0) * kRatioDen));
}

// Per-thread scratch of the search path (no allocation per query once warm).
struct Scratch {
  std::vector<float> page_best;
  std::vector<uint32_t> page_stamp;
  uint32_t stamp = 0;
  std::vector<uint32_t> touched;
  std::vector<Cand> cand;
  std::vector<Cand> beam;
  std::vector<uint32_t> cells;
  std::vector<uint32_t> next_cells;
  std::vector<const void*> rows;
  std::vector<float> scores;
  uint64_t scored = 0;

  void BeginPages(uint32_t limit) {
    if (page_best.size() < limit) {
      page_best.resize(limit);
      page_stamp.resize(limit, 0);
    }
    if (++stamp == 0) {  // wrapped: reset
      std::fill(page_stamp.begin(), page_stamp.end(), 0);
      stamp = 1;
    }
    touched.clear();
  }
  void Touch(uint32_t page, float score) {
    if (page_stamp[page] != stamp) {
      page_stamp[page] = stamp;
      page_best[page] = score;
      touched.push_back(page);
    } else if (score > page_best[page]) {
      page_best[page] = score;
    }
  }
};

Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
}

thread_local uint64_t tls_last_scored = 0;
thread_local uint64_t tls_last_sketched = 0;
thread_local uint32_t tls_last_cells_opened = 0;

// Grows a vector's capacity by an eighth at a time (not doubling), so that the metadata of a
// tree that grows by inserts stays close to its size.
template <class V>
void ReserveFor(V& v, size_t n) {
  if (v.capacity() < n) v.reserve(n + n / 8 + 4);
}

}  // namespace

struct DciTree::Cell {
  uint32_t owner = kNone;          // parent token; kNone for the root cell
  uint8_t level = 0;               // level of the member tokens
  float max_sq = 0;                // M_c: the norm bound the projections below were computed with
  std::vector<float> proj;         // ascending
  std::vector<uint32_t> tok;       // tokens in projection order
  std::vector<uint32_t> page_ids;  // pages of the cell, in projection order
  std::vector<uint32_t> page_end;  // exclusive end (index into tok) of each page's run
  // kBestFirstSketch: the sketch of each token's residual to the cell's reference point,
  // parallel to tok: the codes in the fast-scan layout (simd.h: blocks of 16 keys,
  // PackedSketchBytes(tok.size(), bits)) and one fp16 factor per key.
  std::vector<uint8_t> code;
  std::vector<uint16_t> fac;  // fp16

  uint32_t PageStart(size_t j) const { return j == 0 ? 0 : page_end[j - 1]; }
  uint64_t Bytes() const {
    return proj.capacity() * sizeof(float) + tok.capacity() * sizeof(uint32_t) +
           page_ids.capacity() * sizeof(uint32_t) + page_end.capacity() * sizeof(uint32_t) +
           code.capacity() + fac.capacity() * sizeof(uint16_t);
  }
};

struct DciTree::Impl {
  struct PageMeta {
    uint32_t cell = kNone;
    uint32_t valid = 0;
  };
  // A query or a key looking for its neighbours, in the lifted space.
  struct Probe {
    const float* x = nullptr;  // [dim] fp32
    float extra = 0;           // lifted coordinate: sqrt(M - |x|^2) for keys, 0 for queries
    float dir_proj = 0;        // u[:dim] . x (keys) or u[:dim] . x/|x| (queries)
    float sq = 0;              // |x|^2 (keys)
    bool is_key = false;
  };

  IndexGeometry g;
  DciOptions o;
  const PageReader* reader;
  uint64_t row_bytes;
  std::vector<float> u;  // dim + 1, unit norm
  uint64_t r1_num, r2_num;

  // Per-token metadata (index = insertion order).
  std::vector<uint32_t> position;
  std::vector<uint8_t> level;
  std::vector<uint32_t> page_of;
  std::vector<uint8_t> slot_of;
  std::vector<float> sq;

  std::vector<Cell> cells;
  uint32_t root_cell = kNone;
  absl::flat_hash_map<uint32_t, uint32_t> child_cell;  // token -> cell of its children
  std::vector<PageMeta> pages;
  std::vector<uint32_t> free_pages;
  uint32_t live_pages = 0;
  std::vector<std::vector<uint32_t>> level_tokens;  // level >= 1 only
  std::vector<uint64_t> count_ge;                   // tokens with level >= l
  int top = -1;
  float M = 0;
  bool built = false;

  // Best-first search state (search_mode != kBeamDescent), per cell: the reference point
  // (bf16, the mean of the members when last centred), the radius (an upper bound of
  // |k - ref| over the members), |ref|, and the member count when last centred (a cell is
  // re-centred when it doubles).
  bool cell_refs = false;
  bool sketching = false;
  bool clustered = false;  // DciOptions::kClustered in effect
  std::unique_ptr<ResidualSketch> sketch;
  std::vector<uint16_t> cell_ref;  // [cells][dim]
  std::vector<float> cell_radius, cell_ref_norm;
  std::vector<uint32_t> cell_centered;

  // Ingest context (Build/Insert, under the writer lock).
  // During Build, the keys of the upper levels (about r1 of all tokens, read over and over
  // by every parent search) are gathered into one small buffer, so that the searches hit
  // cache instead of striding through the whole prompt. Freed when Build ends.
  std::vector<uint8_t> upper_keys;
  std::vector<uint32_t> upper_row;  // token -> row in upper_keys, or kNone
  // parent_beam (BeamLayoutBegin): the upper tokens' keys and lifted coordinates in cell order,
  // the token of each row, each row's children as a row range, the row of each upper token
  // (by upper_row), the root's rows.
  std::vector<uint8_t> beam_rows;
  std::vector<float> beam_lift;
  std::vector<uint32_t> beam_tok;
  std::vector<std::pair<uint32_t, uint32_t>> beam_child;  // [row]: its children's rows
  std::vector<uint32_t> beam_row_of;                      // [upper_row]: row, or kNone
  std::pair<uint32_t, uint32_t> root_rows{0, 0};
  const KeyBatch* batch = nullptr;
  uint32_t batch_begin = 0;
  const std::atomic<bool>* cancel_flag = nullptr;                    // of the Build in progress
  absl::flat_hash_map<uint32_t, std::pair<uint32_t, uint8_t>> orig;  // pre-change locations
  std::vector<uint8_t> page_flags;  // bit 0 changed, bit 1 allocated now, bit 2 freed now
  std::vector<uint32_t> flagged;
  std::vector<uint32_t> pending_free;

  Impl(const IndexGeometry& geometry, const DciOptions& options, const PageReader* r)
      : g(geometry),
        o(options),
        reader(r),
        row_bytes(uint64_t{geometry.dim} * ElemBytes(geometry.elem_type)),
        r1_num(RatioNumerator(options.promotion_ratio_1)),
        r2_num(RatioNumerator(options.promotion_ratio_2)) {
    std::mt19937_64 rng(options.seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    u.resize(g.dim + 1);
    double norm = 0;
    for (float& v : u) {
      v = normal(rng);
      norm += double(v) * v;
    }
    for (float& v : u) v = static_cast<float>(v / std::sqrt(norm));
    level_tokens.resize(kMaxLevels);
    count_ge.assign(kMaxLevels + 1, 0);
    cell_refs = o.search_mode != DciOptions::SearchMode::kBeamDescent;
    clustered = o.page_order == DciOptions::PageOrder::kClustered && cell_refs &&
                o.parent_beam > 0 && !o.page_granular_scoring;
    sketching = o.search_mode == DciOptions::SearchMode::kBestFirstSketch;
    if (sketching) sketch = std::make_unique<ResidualSketch>(g.dim, o.seed);
  }

  // ------------------------------------------------------------------ key access
  const void* KeyPtr(uint32_t t) const {
    if (!upper_row.empty() && upper_row[t] != kNone) {
      return upper_keys.data() + uint64_t{upper_row[t]} * row_bytes;
    }
    if (batch != nullptr && t >= batch_begin) return batch->keys.row(t - batch_begin);
    uint32_t p = page_of[t];
    uint32_t s = slot_of[t];
    if (!orig.empty()) {
      auto it = orig.find(t);
      if (it != orig.end()) {
        p = it->second.first;
        s = it->second.second;
      }
    }
    return static_cast<const uint8_t*>(reader->PageKeys(p)) + s * row_bytes;
  }

  float Lift(uint32_t t) const { return std::sqrt(std::max(M - sq[t], 0.f)); }

  float ProjOf(uint32_t t, float max_sq) const {
    return Dot(u.data(), KeyPtr(t), g.elem_type, g.dim) +
           u[g.dim] * std::sqrt(std::max(max_sq - sq[t], 0.f));
  }

  float ProbeProj(const Probe& p, const Cell& c) const {
    if (p.is_key) return p.dir_proj + u[g.dim] * std::sqrt(std::max(c.max_sq - p.sq, 0.f));
    return o.scale_query_projection ? std::sqrt(c.max_sq) * p.dir_proj : p.dir_proj;
  }

  Probe KeyProbe(uint32_t t, std::vector<float>* buf) const {
    buf->resize(g.dim);
    ToFloat(KeyPtr(t), g.elem_type, g.dim, buf->data());
    Probe p;
    p.x = buf->data();
    p.sq = sq[t];
    p.extra = Lift(t);
    p.dir_proj = 0;
    for (uint32_t i = 0; i < g.dim; ++i) p.dir_proj += u[i] * p.x[i];
    p.is_key = true;
    return p;
  }

  // ------------------------------------------------------------------ levels
  int AssignLevel() {
    ++count_ge[0];
    int l = 0;
    while (l + 1 < kMaxLevels) {
      const uint64_t num = l == 0 ? r1_num : r2_num;
      const uint64_t c = count_ge[l];
      if ((c * num) / kRatioDen > ((c - 1) * num) / kRatioDen) {
        ++l;
        ++count_ge[l];
      } else {
        break;
      }
    }
    return l;
  }

  // ------------------------------------------------------------------ pages and locations
  void Flag(uint32_t p, uint8_t bit) {
    if (page_flags.size() <= p) page_flags.resize(p + 1, 0);
    if (page_flags[p] == 0) flagged.push_back(p);
    page_flags[p] |= bit;
  }
  void MarkChanged(uint32_t p) { Flag(p, 1); }

  uint32_t AllocPage(uint32_t cell) {
    uint32_t p;
    if (!free_pages.empty()) {
      p = free_pages.back();
      free_pages.pop_back();
    } else {
      p = static_cast<uint32_t>(pages.size());
      pages.emplace_back();
    }
    pages[p] = PageMeta{cell, 0};
    ++live_pages;
    Flag(p, 1 | 2);
    return p;
  }

  void FreePage(uint32_t p) {
    pages[p] = PageMeta{};
    --live_pages;
    Flag(p, 4);
    pending_free.push_back(p);  // reusable only after this change is applied
  }

  // Moves token t to (p, s), remembering where an existing token was before this change.
  void SetLoc(uint32_t t, uint32_t p, uint32_t s) {
    if (t < batch_begin && page_of[t] != kNone && !orig.contains(t)) {
      orig.emplace(t, std::make_pair(page_of[t], slot_of[t]));
    }
    page_of[t] = p;
    slot_of[t] = static_cast<uint8_t>(s);
  }
  void DetachLoc(uint32_t t) {
    if (t < batch_begin && page_of[t] != kNone && !orig.contains(t)) {
      orig.emplace(t, std::make_pair(page_of[t], slot_of[t]));
    }
    page_of[t] = kNone;
  }

  uint32_t NewCell(uint32_t owner, int lvl) {
    cells.emplace_back();
    cells.back().owner = owner;
    cells.back().level = static_cast<uint8_t>(lvl);
    const uint32_t id = static_cast<uint32_t>(cells.size() - 1);
    if (owner != kNone) child_cell[owner] = id;
    if (cell_refs) {
      ReserveFor(cell_ref, cells.size() * uint64_t{g.dim});
      cell_ref.resize(cells.size() * uint64_t{g.dim}, 0);
      cell_radius.push_back(0);
      cell_ref_norm.push_back(0);
      cell_centered.push_back(0);
    }
    return id;
  }

  // ------------------------------------------------------------------ cell references
  // Sets the cell's reference point to the mean of its members (rounded to bf16), its radius
  // to the farthest member, and (sketching) every member's sketch.
  void RecenterCell(uint32_t cid) {
    Cell& c = cells[cid];
    const uint32_t n = static_cast<uint32_t>(c.tok.size());
    const uint32_t d = g.dim;
    cell_centered[cid] = n;
    cell_radius[cid] = 0;
    if (n == 0) {
      c.code.clear();
      c.fac.clear();
      return;
    }
    std::vector<float> x(d), mean(d, 0.f);
    for (uint32_t t : c.tok) {
      ToFloat(KeyPtr(t), g.elem_type, d, x.data());
      for (uint32_t i = 0; i < d; ++i) mean[i] += x[i];
    }
    uint16_t* ref = cell_ref.data() + uint64_t{cid} * d;
    double norm = 0;
    for (uint32_t i = 0; i < d; ++i) {
      ref[i] = FloatToBf16(mean[i] / static_cast<float>(n));
      mean[i] = Bf16ToFloat(ref[i]);
      norm += double(mean[i]) * mean[i];
    }
    cell_ref_norm[cid] = static_cast<float>(std::sqrt(norm));
    uint8_t* rows = nullptr;
    if (sketching) {
      c.fac.resize(n);
      rows = RowCodes(n);
    }
    for (uint32_t i = 0; i < n; ++i) {
      MemberResidual(cid, i, mean.data(), x.data(),
                     sketching ? rows + uint64_t{i} * sketch->code_bytes() : nullptr);
    }
    if (sketching) PackCell(c, rows);
  }

  // Scratch for a cell's codes in row-major order ([n][code_bytes], per thread).
  uint8_t* RowCodes(uint32_t n) const {
    thread_local std::vector<uint8_t> buf;
    const uint64_t need = uint64_t{n} * sketch->code_bytes();
    if (buf.size() < need) buf.resize(need);
    return buf.data();
  }
  // The cell's codes (tok.size() of them) from row-major `rows` into the fast-scan layout.
  void PackCell(Cell& c, const uint8_t* rows) const {
    const uint32_t n = static_cast<uint32_t>(c.tok.size());
    const uint64_t bytes = PackedSketchBytes(n, sketch->bits());
    // Grows by a block (16 keys) at a time: no further slack.
    if (c.code.capacity() < bytes) c.code.reserve(bytes);
    c.code.resize(bytes);
    PackSketchCodes(rows, n, sketch->bits(), c.code.data());
  }

  // Residual of member i of cell cid to the reference `ref` (fp32): widens the radius and,
  // when sketching, writes the member's code to `code` (row-major) and its factor. `x` is
  // scratch of dim floats.
  void MemberResidual(uint32_t cid, uint32_t i, const float* ref, float* x, uint8_t* code) {
    Cell& c = cells[cid];
    const uint32_t d = g.dim;
    ToFloat(KeyPtr(c.tok[i]), g.elem_type, d, x);
    for (uint32_t k = 0; k < d; ++k) x[k] -= ref[k];
    const float e2 = SquaredNorm(x, ElemType::kF32, d);  // within ~1e-6 relative
    // Rounded up: the bound must hold for the scores the kernels compute.
    const float r = static_cast<float>(std::sqrt(e2)) * (1.0f + 1e-5f) + 1e-6f;
    cell_radius[cid] = std::max(cell_radius[cid], r);
    if (sketching) {
      std::vector<float>& buf = SketchBuffer();
      c.fac[i] = FloatToHalf(sketch->Encode(x, code, buf.data()));
    }
  }

  std::vector<uint8_t>& CodeBuffer() const {
    thread_local std::vector<uint8_t> buf;
    if (buf.size() < sketch->code_bytes()) buf.resize(sketch->code_bytes());
    return buf;
  }

  std::vector<float>& SketchBuffer() const {
    thread_local std::vector<float> buf;
    if (buf.size() < sketch->bits()) buf.resize(sketch->bits());
    return buf;
  }

  std::vector<float> CellRef(uint32_t cid) const {
    std::vector<float> r(g.dim);
    const uint16_t* ref = cell_ref.data() + uint64_t{cid} * g.dim;
    for (uint32_t i = 0; i < g.dim; ++i) r[i] = Bf16ToFloat(ref[i]);
    return r;
  }

  // Member idx of cell cid was just inserted into tok: re-centre the cell when it has doubled
  // since its last centring, else widen the radius and sketch the new member.
  void AddMember(uint32_t cid, uint32_t idx) {
    if (!cell_refs) return;
    Cell& c = cells[cid];
    if (c.tok.size() >= 2 * std::max<uint32_t>(cell_centered[cid], 2)) {
      RecenterCell(cid);
      return;
    }
    std::vector<float> x(g.dim);
    const std::vector<float> ref = CellRef(cid);
    if (!sketching) {
      MemberResidual(cid, idx, ref.data(), x.data(), nullptr);
      return;
    }
    // The new member's code goes in place into the packed codes of the n - 1 old members.
    const uint32_t n = static_cast<uint32_t>(c.tok.size());
    std::vector<uint8_t>& code = CodeBuffer();
    c.fac.insert(c.fac.begin() + idx, uint16_t{0});
    MemberResidual(cid, idx, ref.data(), x.data(), code.data());
    const uint64_t bytes = PackedSketchBytes(n, sketch->bits());
    if (c.code.size() < bytes) {
      if (c.code.capacity() < bytes) c.code.reserve(bytes);  // a block (16 keys) at a time
      c.code.resize(bytes, 0);
    }
    InsertPackedSketchCode(c.code.data(), n, sketch->bits(), idx, code.data());
  }

  // Lays the cell's tokens (already sorted) into ceil(n / page_size) pages of even fill,
  // reusing the cell's page ids and allocating or freeing the difference.
  void ChunkCell(uint32_t cid) {
    Cell& c = cells[cid];
    const uint32_t n = static_cast<uint32_t>(c.tok.size());
    const uint32_t need = (n + g.page_size - 1) / g.page_size;
    while (c.page_ids.size() < need) c.page_ids.push_back(AllocPage(cid));
    while (c.page_ids.size() > need) {
      FreePage(c.page_ids.back());
      c.page_ids.pop_back();
    }
    c.page_end.assign(need, 0);
    for (uint32_t t : c.tok) DetachLoc(t);
    uint32_t i = 0;
    for (uint32_t j = 0; j < need; ++j) {
      const uint32_t fill = n / need + (j < n % need ? 1 : 0);
      const uint32_t p = c.page_ids[j];
      for (uint32_t s = 0; s < fill; ++s) SetLoc(c.tok[i++], p, s);
      c.page_end[j] = i;
      pages[p].valid = fill;
      MarkChanged(p);
    }
  }

  // kClustered: reorders toks (the members of one cell) so that ChunkCell's runs are clusters.
  // The pages [lo, hi) of ChunkCell's even fill over rows [start(lo), start(hi)) of the
  // permutation are cut at the page boundary nearest their middle, the rows split there by
  // their projection on the rows' first principal component (nth_element at the cut), and
  // both sides recursed. The component: power iteration (4 steps) on the centred rows, from
  // the row farthest from their mean. Rows are the members' keys in fp32, kept in the order
  // being built (each range one contiguous block, permuted in place after its split), and
  // never centred in memory: X_c v = X v - (mean . v) and X_c^T p = X^T p - mean * sum(p), so
  // every product is one sequential pass of a SIMD kernel over the block.
  static constexpr int kClusterPowerSteps = 4;
  // Cells above this many members keep the projection order (bounds the build's fp32 copies
  // to 2 x kClusterMaxRows x dim floats and its time on degenerate data, e.g. identical keys,
  // where one cell holds everything); inserts compare with at most kClusterInsertProbes
  // members of a cell, evenly spaced.
  static constexpr uint32_t kClusterMaxRows = 8192;
  static constexpr uint32_t kClusterInsertProbes = 1024;
  void ClusterOrder(std::vector<uint32_t>* toks) const {
    const uint32_t n = static_cast<uint32_t>(toks->size()), ps = g.page_size, dim = g.dim;
    const uint32_t need = (n + ps - 1) / ps;
    if (need <= 1) return;
    auto start = [&](uint32_t j) { return j * (n / need) + std::min(j, n % need); };
    std::vector<uint32_t>& ids = *toks;  // permuted along with the rows of x
    std::vector<float> x(uint64_t{n} * dim), scratch(uint64_t{n} * dim), sqn(n), sqn_tmp(n);
    for (uint32_t i = 0; i < n; ++i) {
      float* row = &x[uint64_t{i} * dim];
      ToFloat(KeyPtr(ids[i]), g.elem_type, dim, row);
      sqn[i] = SquaredNorm(row, ElemType::kF32, dim);
    }
    std::vector<float> ones(n, 1.f), mean(dim), v(dim), w(dim), p(n);
    std::vector<uint32_t> local(n), ids_tmp(n);
    const uint64_t stride = uint64_t{dim} * sizeof(float);
    struct Range {
      uint32_t lo, hi;
    };
    std::vector<Range> todo = {{0, need}};
    while (!todo.empty()) {
      const Range r = todo.back();
      todo.pop_back();
      if (r.hi - r.lo <= 1) continue;
      const uint32_t b = start(r.lo), e = start(r.hi), m = e - b;
      const uint32_t mid_page = r.lo + (r.hi - r.lo) / 2;
      const uint32_t cut = start(mid_page) - b;
      float* block = &x[uint64_t{b} * dim];
      std::fill(mean.begin(), mean.end(), 0.f);
      WeightedSumStridedMulti(ones.data(), 1, m, block, stride, m, ElemType::kF32, dim,
                              mean.data());
      for (float& c : mean) c /= static_cast<float>(m);
      // The farthest row from the mean: |x_i|^2 - 2 x_i . mean is largest (ties: the first).
      DotStrided(mean.data(), block, stride, m, ElemType::kF32, dim, p.data());
      uint32_t far = 0;
      float far_sq = -std::numeric_limits<float>::infinity();
      for (uint32_t i = 0; i < m; ++i) {
        const float s2 = sqn[b + i] - 2 * p[i];
        if (s2 > far_sq) far_sq = s2, far = i;
      }
      for (uint32_t d = 0; d < dim; ++d) v[d] = block[uint64_t{far} * dim + d] - mean[d];
      for (int it = 0; it < kClusterPowerSteps; ++it) {
        DotStrided(v.data(), block, stride, m, ElemType::kF32, dim, p.data());
        float mv = 0;
        for (uint32_t d = 0; d < dim; ++d) mv += mean[d] * v[d];
        double sum_p = 0;
        for (uint32_t i = 0; i < m; ++i) {
          p[i] -= mv;  // (x_i - mean) . v
          sum_p += p[i];
        }
        std::fill(w.begin(), w.end(), 0.f);
        WeightedSumStridedMulti(p.data(), 1, m, block, stride, m, ElemType::kF32, dim, w.data());
        double norm = 0;
        for (uint32_t d = 0; d < dim; ++d) {
          w[d] -= mean[d] * static_cast<float>(sum_p);
          norm += double{w[d]} * w[d];
        }
        if (norm <= 0) break;  // every row equal
        const float inv = static_cast<float>(1.0 / std::sqrt(norm));
        for (uint32_t d = 0; d < dim; ++d) v[d] = w[d] * inv;
      }
      // Projections (uncentred: a constant shift leaves the order); the range sorted around
      // the cut (ties by position), then its rows, ids and norms permuted to match.
      DotStrided(v.data(), block, stride, m, ElemType::kF32, dim, p.data());
      for (uint32_t i = 0; i < m; ++i) local[i] = i;
      std::nth_element(
          local.begin(), local.begin() + cut, local.begin() + m,
          [&](uint32_t a, uint32_t c) { return p[a] < p[c] || (p[a] == p[c] && a < c); });
      for (uint32_t i = 0; i < m; ++i) {
        std::copy_n(block + uint64_t{local[i]} * dim, dim, &scratch[uint64_t{i} * dim]);
        ids_tmp[i] = ids[b + local[i]];
        sqn_tmp[i] = sqn[b + local[i]];
      }
      std::copy_n(scratch.begin(), uint64_t{m} * dim, block);
      std::copy_n(ids_tmp.begin(), m, ids.begin() + b);
      std::copy_n(sqn_tmp.begin(), m, sqn.begin() + b);
      todo.push_back({r.lo, mid_page});
      todo.push_back({mid_page, r.hi});
    }
  }

  // kClustered: the cell's tokens (c.tok, any order) in ClusterOrder, projections their ranks
  // (kept ascending by inserts: a new token takes the midpoint of its neighbours'). Returns
  // false, changing nothing, where the cell keeps the projection order (kProjection, or a cell
  // over kClusterMaxRows members).
  bool ClusterCell(Cell& c) const {
    if (!clustered || c.tok.size() > kClusterMaxRows) return false;
    ClusterOrder(&c.tok);
    c.proj.resize(c.tok.size());
    for (size_t i = 0; i < c.proj.size(); ++i) c.proj[i] = static_cast<float>(i);
    return true;
  }

  // The cell's tokens (c.tok, any order) in its page order, c.proj to match: ClusterCell's
  // where it applies, else ascending projection at the cell's max_sq (ties by token).
  void OrderCell(Cell& c) const {
    if (ClusterCell(c)) return;
    std::vector<std::pair<float, uint32_t>> order(c.tok.size());
    for (size_t i = 0; i < c.tok.size(); ++i) order[i] = {ProjOf(c.tok[i], c.max_sq), c.tok[i]};
    std::sort(order.begin(), order.end());
    c.proj.resize(order.size());
    for (size_t i = 0; i < order.size(); ++i) {
      c.proj[i] = order[i].first;
      c.tok[i] = order[i].second;
    }
  }

  // Recomputes every projection of the cell with its current max_sq, re-sorts, re-chunks.
  void Reproject(uint32_t cid) {
    OrderCell(cells[cid]);
    ChunkCell(cid);
    if (cell_refs) RecenterCell(cid);
  }

  // Adds token t (detached) to cell cid.
  void CellInsert(uint32_t cid, uint32_t t) {
    if (clustered && !cells[cid].page_ids.empty()) {
      ClusteredInsert(cid, t);
      return;
    }
    {
      Cell& c = cells[cid];
      if (sq[t] > c.max_sq * o.reproject_growth || c.page_ids.empty()) {
        c.max_sq = sq[t];
        for (uint32_t m : c.tok) c.max_sq = std::max(c.max_sq, sq[m]);
        ReserveFor(c.proj, c.proj.size() + 1);
        ReserveFor(c.tok, c.tok.size() + 1);
        c.proj.push_back(0);
        c.tok.push_back(t);
        Reproject(cid);
        return;
      }
    }
    const float pr = ProjOf(t, cells[cid].max_sq);
    Cell& c = cells[cid];
    const uint32_t idx =
        static_cast<uint32_t>(std::upper_bound(c.proj.begin(), c.proj.end(), pr) - c.proj.begin());
    // The page that takes it: the one whose run contains idx; at a boundary between two
    // runs, the emptier of the two.
    size_t j = std::upper_bound(c.page_end.begin(), c.page_end.end(), idx) - c.page_end.begin();
    if (j == c.page_ids.size()) {
      j = c.page_ids.size() - 1;
    } else if (idx == c.PageStart(j) && j > 0 &&
               pages[c.page_ids[j - 1]].valid <= pages[c.page_ids[j]].valid) {
      j = j - 1;
    }
    PlaceMember(cid, t, idx, pr, j);
  }

  // Puts token t (detached) at position idx of cell cid's order, with projection pr, into the
  // cell's page j (whose run then holds idx): a free slot of that page, or a split when full.
  void PlaceMember(uint32_t cid, uint32_t t, uint32_t idx, float pr, size_t j) {
    Cell& c = cells[cid];
    ReserveFor(c.proj, c.proj.size() + 1);
    ReserveFor(c.tok, c.tok.size() + 1);
    if (sketching) ReserveFor(c.fac, c.fac.size() + 1);
    c.proj.insert(c.proj.begin() + idx, pr);
    c.tok.insert(c.tok.begin() + idx, t);
    for (size_t i = j; i < c.page_end.size(); ++i) ++c.page_end[i];
    AddMember(cid, idx);
    const uint32_t p = c.page_ids[j];
    if (pages[p].valid < g.page_size) {
      SetLoc(t, p, pages[p].valid);
      ++pages[p].valid;
      MarkChanged(p);
    } else {
      Split(cid, j);
    }
  }

  // kClustered: token t (detached) joins the run of its nearest member (Euclidean; of at most
  // kClusterInsertProbes evenly spaced members), right after it, in that member's page (split
  // in two when full).
  void ClusteredInsert(uint32_t cid, uint32_t t) {
    Cell& c = cells[cid];
    c.max_sq = std::max(c.max_sq, sq[t]);
    const uint32_t n = static_cast<uint32_t>(c.tok.size());
    std::vector<float> x(g.dim);
    ToFloat(KeyPtr(t), g.elem_type, g.dim, x.data());
    const uint32_t step = (n + kClusterInsertProbes - 1) / kClusterInsertProbes;
    const uint32_t probes = (n + step - 1) / step;
    std::vector<const void*> rows(probes);
    for (uint32_t i = 0; i < probes; ++i) rows[i] = KeyPtr(c.tok[i * step]);
    std::vector<float> dots(probes);
    DotGather(x.data(), rows.data(), probes, g.elem_type, g.dim, dots.data());
    uint32_t near = 0;
    float best = std::numeric_limits<float>::infinity();
    for (uint32_t i = 0; i < probes; ++i) {
      const float d2 = sq[c.tok[i * step]] - 2 * dots[i];  // |x - k_i|^2 - |x|^2
      if (d2 < best) best = d2, near = i * step;
    }
    const uint32_t idx = near + 1;
    const float pr = idx < n ? (c.proj[near] + c.proj[idx]) / 2 : c.proj[near] + 1;
    const size_t j =
        std::upper_bound(c.page_end.begin(), c.page_end.end(), near) - c.page_end.begin();
    PlaceMember(cid, t, idx, pr, j);
  }

  // Page j of the cell holds page_size + 1 tokens in its run (one of them detached): cut
  // the run in two; the upper half moves to a new page.
  void Split(uint32_t cid, size_t j) {
    const uint32_t q = AllocPage(cid);
    Cell& c = cells[cid];
    const uint32_t a = c.PageStart(j), b = c.page_end[j];
    const uint32_t mid = a + (b - a) / 2;
    const uint32_t p = c.page_ids[j];
    c.page_ids.insert(c.page_ids.begin() + j + 1, q);
    c.page_end.insert(c.page_end.begin() + j, mid);
    uint32_t s = 0;
    for (uint32_t i = mid; i < b; ++i) SetLoc(c.tok[i], q, s++);
    pages[q].valid = b - mid;
    // Compact the lower half into slots [0, mid - a).
    const uint32_t keep = mid - a;
    std::vector<uint8_t> used(g.page_size, 0);
    std::vector<uint32_t> homeless;
    for (uint32_t i = a; i < mid; ++i) {
      const uint32_t t = c.tok[i];
      if (page_of[t] == p && slot_of[t] < keep) {
        used[slot_of[t]] = 1;
      } else {
        homeless.push_back(t);
      }
    }
    uint32_t hole = 0;
    for (uint32_t t : homeless) {
      while (used[hole]) ++hole;
      used[hole] = 1;
      SetLoc(t, p, hole);
    }
    pages[p].valid = keep;
    MarkChanged(p);
    MarkChanged(q);
  }

  // Removes the members `gone` (distinct, all in cell cid) in one pass, O(cell) in all (the
  // radius stays a valid bound). In each page the remaining members keep slots
  // [0, valid): those above the new fill move into the holes; emptied pages are freed.
  void CellRemoveMany(uint32_t cid, const std::vector<uint32_t>& gone) {
    if (gone.empty()) return;
    const absl::flat_hash_set<uint32_t> out(gone.begin(), gone.end());
    Cell& c = cells[cid];
    const uint32_t n = static_cast<uint32_t>(c.tok.size());
    std::vector<uint8_t> keep(n, 1);
    std::vector<uint32_t> ids, ends, holes, movers;
    uint32_t kept = 0;
    for (size_t j = 0; j < c.page_ids.size(); ++j) {
      const uint32_t p = c.page_ids[j];
      const uint32_t a = c.PageStart(j), b = c.page_end[j];
      uint32_t removed = 0;
      for (uint32_t i = a; i < b; ++i) {
        if (out.contains(c.tok[i])) {
          keep[i] = 0;
          ++removed;
        }
      }
      if (removed > 0) {
        ICECACHE_CHECK(pages[p].valid == b - a) << "page " << p << " is not its run";
        const uint32_t fill = b - a - removed;
        holes.clear();
        movers.clear();
        for (uint32_t i = a; i < b; ++i) {
          const uint32_t t = c.tok[i];
          if (!keep[i]) {
            if (slot_of[t] < fill) holes.push_back(slot_of[t]);
            DetachLoc(t);
          } else if (slot_of[t] >= fill) {
            movers.push_back(t);
          }
        }
        ICECACHE_CHECK(holes.size() == movers.size()) << "page " << p << " slots out of step";
        for (size_t k = 0; k < movers.size(); ++k) SetLoc(movers[k], p, holes[k]);
        pages[p].valid = fill;
        MarkChanged(p);
        if (fill == 0) {
          FreePage(p);
          continue;
        }
      }
      kept += b - a - removed;
      ids.push_back(p);
      ends.push_back(kept);
    }
    c.page_ids.swap(ids);
    c.page_end.swap(ends);
    uint8_t* rows = nullptr;
    const uint32_t cb = sketching ? sketch->code_bytes() : 0;
    if (sketching) {
      rows = RowCodes(n);
      UnpackSketchCodes(c.code.data(), n, sketch->bits(), rows);
    }
    uint32_t w = 0;
    for (uint32_t i = 0; i < n; ++i) {
      if (!keep[i]) continue;
      c.tok[w] = c.tok[i];
      c.proj[w] = c.proj[i];
      if (sketching) {
        c.fac[w] = c.fac[i];
        if (w != i) std::memcpy(rows + uint64_t{w} * cb, rows + uint64_t{i} * cb, cb);
      }
      ++w;
    }
    c.tok.resize(w);
    c.proj.resize(w);
    if (sketching) {
      c.fac.resize(w);
      PackCell(c, rows);
    }
  }

  // ------------------------------------------------------------------ scoring and descent
  // Scores the `ratio` share (at least `want`) of cell c closest to the probe in projection;
  // appends candidates and, when `scratch_pages`, records each page's best score.
  void ScoreCell(uint32_t cid, const Probe& probe, double ratio, uint32_t want, bool track_pages,
                 Scratch& sc) const {
    const Cell& c = cells[cid];
    const uint32_t n = static_cast<uint32_t>(c.tok.size());
    if (n == 0) return;
    const uint32_t r = std::min<uint32_t>(
        n, std::max<uint32_t>(static_cast<uint32_t>(std::ceil(ratio * n)), want));
    uint32_t lo = 0, hi = n;
    if (r < n) {
      const float qp = ProbeProj(probe, c);
      const uint32_t idx = static_cast<uint32_t>(
          std::lower_bound(c.proj.begin(), c.proj.end(), qp) - c.proj.begin());
      lo = idx;
      hi = idx;
      while (hi - lo < r) {
        if (lo == 0) {
          hi = lo + r;
        } else if (hi == n) {
          lo = hi - r;
        } else if (qp - c.proj[lo - 1] <= c.proj[hi] - qp) {
          --lo;
        } else {
          ++hi;
        }
      }
    }
    const uint32_t m = hi - lo;
    sc.rows.resize(m);
    sc.scores.resize(m);
    for (uint32_t i = 0; i < m; ++i) sc.rows[i] = KeyPtr(c.tok[lo + i]);
    DotGather(probe.x, sc.rows.data(), m, g.elem_type, g.dim, sc.scores.data());
    sc.scored += m;
    for (uint32_t i = 0; i < m; ++i) {
      const uint32_t t = c.tok[lo + i];
      float s = sc.scores[i];
      if (probe.extra != 0) s += probe.extra * Lift(t);
      sc.cand.push_back({s, t});
      if (track_pages) sc.Touch(page_of[t], s);
    }
  }

  uint32_t ChildPages(uint32_t t) const {
    auto it = child_cell.find(t);
    return it == child_cell.end() ? 0 : static_cast<uint32_t>(cells[it->second].page_ids.size());
  }

  // Beam descent from the root to `target` level. Returns the best `out_count` candidates
  // scored on that level, best first. `want_last`: the beam above the target level covers
  // at least this many of its pages (so a query can fill k pages).
  void Descend(const Probe& probe, int target, uint32_t fov, double ratio, uint32_t want_last,
               bool track_pages, size_t out_count, Scratch& sc, std::vector<Cand>* out) const {
    sc.cells.assign(1, root_cell);
    for (int lvl = top;; --lvl) {
      sc.cand.clear();
      const uint32_t want = lvl == target ? want_last : fov;
      for (uint32_t cid : sc.cells) ScoreCell(cid, probe, ratio, want, track_pages, sc);
      if (lvl == target || sc.cand.empty()) {
        // Only the best out_count candidates are wanted (none for a query, whose result is
        // the per-page scores recorded on the way).
        const size_t n = std::min<size_t>(out_count, sc.cand.size());
        std::partial_sort(sc.cand.begin(), sc.cand.begin() + n, sc.cand.end(), ByScoreDesc);
        out->assign(sc.cand.begin(), sc.cand.begin() + n);
        return;
      }
      // Next beam: the best FOV tokens, extended until their cells cover want_last pages
      // when the next level is the target.
      const size_t nb = std::min<size_t>(fov, sc.cand.size());
      std::partial_sort(sc.cand.begin(), sc.cand.begin() + nb, sc.cand.end(), ByScoreDesc);
      size_t take = nb;
      if (lvl - 1 == target) {
        uint64_t covered = 0;
        for (size_t i = 0; i < nb; ++i) covered += ChildPages(sc.cand[i].tok);
        if (covered < want_last && take < sc.cand.size()) {
          std::sort(sc.cand.begin() + nb, sc.cand.end(), ByScoreDesc);
          while (covered < want_last && take < sc.cand.size()) {
            covered += ChildPages(sc.cand[take].tok);
            ++take;
          }
        }
      }
      sc.next_cells.clear();
      for (size_t i = 0; i < take; ++i) {
        auto it = child_cell.find(sc.cand[i].tok);
        if (it != child_cell.end() && !cells[it->second].tok.empty()) {
          sc.next_cells.push_back(it->second);
        }
      }
      if (sc.next_cells.empty()) {
        out->clear();
        return;
      }
      sc.cells.swap(sc.next_cells);
    }
  }

  // Nearest (in the lifted metric) tokens to t among those exactly on level `lvl`, best
  // first, at most `count`, excluding t itself.
  void NearestOnLevel(uint32_t t, int lvl, uint32_t count, uint32_t fov, double ratio,
                      std::vector<Cand>* out) const {
    std::vector<float> buf;
    const Probe probe = KeyProbe(t, &buf);
    ICECACHE_CHECK(lvl >= 1 && lvl <= top) << "no neighbour search on level " << lvl;
    const std::vector<uint32_t>& members = level_tokens[lvl];
    out->clear();
    bool exact = lvl == top || members.size() <= ExactParentMax();
    if (!exact) {
      Scratch& sc = ThreadScratch();
      Descend(probe, lvl, fov, ratio, count, /*track_pages=*/false, count + 1, sc, out);
      out->erase(
          std::remove_if(out->begin(), out->end(), [t](const Cand& c) { return c.tok == t; }),
          out->end());
      // A descent can end where none of its beam's tokens has children (nothing chose them as
      // the nearest parent): then every token of the level is scored.
      exact = out->empty();
    }
    if (exact) ScoreLevel(probe.x, probe.extra, lvl, t, out);
    if (out->size() > count) out->resize(count);
  }

  // Every token of level `lvl` but `exclude`, scored by the lifted inner product with
  // (x, lift), best first (ties to the lower token).
  void ScoreLevel(const float* x, float lift, int lvl, uint32_t exclude,
                  std::vector<Cand>* out) const {
    out->clear();
    for (uint32_t v : level_tokens[lvl]) {
      if (v == exclude) continue;
      out->push_back({Dot(x, KeyPtr(v), g.elem_type, g.dim) + lift * Lift(v), v});
    }
    std::sort(out->begin(), out->end(), ByScoreDesc);
  }

  // ------------------------------------------------------------------ build
  // The exact nearest parent (lifted metric) of every child: children converted to fp32 in
  // blocks, parents transposed once, a register-tiled kernel scores every pair.
  void ExactParents(const std::vector<uint32_t>& children, const std::vector<uint32_t>& parents,
                    std::vector<uint32_t>* best) const {
    const uint32_t d = g.dim;
    const uint32_t np = static_cast<uint32_t>(parents.size());
    const uint32_t np_pad = (np + 15) / 16 * 16;
    std::vector<float> pt(uint64_t{d} * np_pad, 0.f), pb(np_pad, 0.f), row(d);
    for (uint32_t j = 0; j < np; ++j) {
      ToFloat(KeyPtr(parents[j]), g.elem_type, d, row.data());
      for (uint32_t i = 0; i < d; ++i) pt[uint64_t{i} * np_pad + j] = row[i];
      pb[j] = Lift(parents[j]);
    }
    constexpr uint32_t kBlock = 256;
    std::vector<float> xs(uint64_t{kBlock} * d), lift(kBlock), best_v(kBlock);
    std::vector<uint32_t> best_j(kBlock);
    best->resize(children.size());
    for (size_t c0 = 0; c0 < children.size(); c0 += kBlock) {
      if (Cancelled()) return;  // the caller sees it after the level
      const uint32_t nb = static_cast<uint32_t>(std::min<size_t>(kBlock, children.size() - c0));
      for (uint32_t i = 0; i < nb; ++i) {
        ToFloat(KeyPtr(children[c0 + i]), g.elem_type, d, xs.data() + uint64_t{i} * d);
        lift[i] = Lift(children[c0 + i]);
        best_v[i] = -std::numeric_limits<float>::infinity();
        best_j[i] = 0;
      }
      BestLiftedParents(xs.data(), nb, lift.data(), pt.data(), pb.data(), np, np_pad, d,
                        best_v.data(), best_j.data());
      for (uint32_t i = 0; i < nb; ++i) (*best)[c0 + i] = parents[best_j[i]];
    }
  }

  // Nearest parents of `kids` (on level l) among `parents` (level l + 1): exact while the
  // level above is small, by descent beyond.
  void FullParents(const std::vector<uint32_t>& kids, const std::vector<uint32_t>& parents, int l,
                   std::vector<uint32_t>* parent_of) const {
    if (parents.size() <= ExactParentMax() || (o.parent_beam > 0 && l + 1 == top)) {
      ExactParents(kids, parents, parent_of);
      return;
    }
    if (o.parent_beam > 0 && !beam_tok.empty()) {
      BeamParents(kids, l, parent_of);
      return;
    }
    parent_of->resize(kids.size());
    std::vector<Cand> found;
    std::vector<float> buf;
    Scratch& sc = ThreadScratch();
    for (size_t i = 0; i < kids.size(); ++i) {
      if (i % 256 == 0 && Cancelled()) return;  // the caller sees it after the level
      const Probe probe = KeyProbe(kids[i], &buf);
      Descend(probe, l + 1, BuildFov(), BuildRatio(), 1, false, 1, sc, &found);
      // A descent can end where none of its beam's tokens has children: the exact nearest.
      (*parent_of)[i] =
          found.empty() ? NearestOnLevelExact(probe.x, probe.extra, l + 1) : found.front().tok;
    }
  }

  // Build only (parent_beam): the keys of the tokens on levels >= 1 (as stored) and their
  // lifted coordinates sqrt(M - |k|^2), laid out cell after cell (the root's tokens first,
  // then the children of each upper token contiguously, appended as each level's cells are
  // made), so that scoring the children of a beam token is one pass over consecutive rows.
  void BeamLayoutBegin(const std::vector<uint32_t>& root_tokens) {
    beam_rows.clear();
    beam_lift.clear();
    beam_tok.clear();
    beam_row_of.assign(upper_keys.size() / row_bytes, kNone);
    beam_child.clear();
    root_rows = BeamAppend(root_tokens);
  }

  // Appends the rows of `members`; returns their row range.
  std::pair<uint32_t, uint32_t> BeamAppend(absl::Span<const uint32_t> members) {
    const uint32_t begin = static_cast<uint32_t>(beam_tok.size());
    beam_rows.resize(row_bytes * (begin + members.size()));
    for (size_t i = 0; i < members.size(); ++i) {
      std::memcpy(beam_rows.data() + row_bytes * (begin + i), KeyPtr(members[i]), row_bytes);
      beam_lift.push_back(Lift(members[i]));
      if (upper_row[members[i]] != kNone) beam_row_of[upper_row[members[i]]] = begin + i;
      beam_tok.push_back(members[i]);
      beam_child.push_back({0, 0});
    }
    return {begin, static_cast<uint32_t>(beam_tok.size())};
  }

  // The exact nearest token of level `lvl` to (x, lift): the descents' fallback where their
  // beam ends on tokens without children.
  uint32_t NearestOnLevelExact(const float* x, float lift, int lvl) const {
    std::vector<Cand> all;
    ScoreLevel(x, lift, lvl, kNone, &all);
    ICECACHE_CHECK(!all.empty()) << "level " << lvl << " is empty";
    return all.front().tok;
  }

  // The build's parent search with parent_beam: each kid descends from the root cell, keeping
  // the parent_beam best tokens (lifted inner product; ties to the lower token) of each level
  // and scoring every child of theirs on the next, down to level l + 1, whose best scored
  // token is its parent. Where no beam token has children, the next best ones are taken
  // until one has.
  void BeamParents(const std::vector<uint32_t>& kids, int l,
                   std::vector<uint32_t>* parent_of) const {
    const uint32_t beam = o.parent_beam;
    parent_of->resize(kids.size());
    std::vector<float> x(g.dim), scores;
    std::vector<uint32_t> rows;     // rows (into beam_rows) scored on the current level
    std::vector<const void*> ptrs;  // their addresses
    std::vector<std::pair<uint32_t, uint32_t>> ranges, next;
    std::vector<float> top_s(beam);
    std::vector<uint32_t> top_r(beam);  // the beam: rows, best first
    auto better = [&](float sa, uint32_t ra, float sb, uint32_t rb) {
      return sa > sb || (sa == sb && beam_tok[ra] < beam_tok[rb]);
    };
    for (size_t i = 0; i < kids.size(); ++i) {
      if (i % 256 == 0 && Cancelled()) return;  // the caller sees it after the level
      ToFloat(KeyPtr(kids[i]), g.elem_type, g.dim, x.data());
      const float lift = Lift(kids[i]);
      ranges.assign(1, root_rows);
      for (int lvl = top;; --lvl) {
        uint32_t n = 0;
        for (const auto& [b, e] : ranges) n += e - b;
        scores.resize(n);
        rows.resize(n);
        ptrs.resize(n);
        uint32_t at = 0;
        for (const auto& [b, e] : ranges) {
          for (uint32_t r = b; r < e; ++r) {
            ptrs[at] = beam_rows.data() + row_bytes * r;
            rows[at++] = r;
          }
        }
        // One gather over every range of the level (the ranges are a few rows each).
        DotGather(x.data(), ptrs.data(), n, g.elem_type, g.dim, scores.data());
        for (uint32_t j = 0; j < n; ++j) scores[j] += lift * beam_lift[rows[j]];
        if (lvl == l + 1) {
          uint32_t best = 0;
          for (uint32_t j = 1; j < n; ++j) {
            if (better(scores[j], rows[j], scores[best], rows[best])) best = j;
          }
          (*parent_of)[i] = beam_tok[rows[best]];
          break;
        }
        // The beam: the `beam` best rows, kept sorted by insertion.
        uint32_t kept = 0;
        for (uint32_t j = 0; j < n; ++j) {
          if (kept == beam && !better(scores[j], rows[j], top_s[kept - 1], top_r[kept - 1])) {
            continue;
          }
          uint32_t p = kept < beam ? kept++ : beam - 1;
          while (p > 0 && better(scores[j], rows[j], top_s[p - 1], top_r[p - 1])) {
            top_s[p] = top_s[p - 1];
            top_r[p] = top_r[p - 1];
            --p;
          }
          top_s[p] = scores[j];
          top_r[p] = rows[j];
        }
        next.clear();
        for (uint32_t j = 0; j < kept; ++j) {
          const auto& kr = beam_child[top_r[j]];
          if (kr.second > kr.first) next.push_back(kr);
        }
        if (next.empty()) {
          // No beam token has children: the rest in rank order, until one has.
          std::vector<uint32_t> order(n);
          for (uint32_t j = 0; j < n; ++j) order[j] = j;
          std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
            return better(scores[a], rows[a], scores[b], rows[b]);
          });
          for (uint32_t j = kept; j < n && next.empty(); ++j) {
            const auto& kr = beam_child[rows[order[j]]];
            if (kr.second > kr.first) next.push_back(kr);
          }
        }
        if (next.empty()) {
          // A dead end: no token scored on this level has children (nothing chose them as
          // its nearest parent). The kid takes the exact nearest token of level l + 1.
          (*parent_of)[i] = NearestOnLevelExact(x.data(), lift, l + 1);
          break;
        }
        ranges.swap(next);
      }
    }
  }

  // The paper's anchor shortcut: every anchor_interval-th kid (in token order) gets its parent
  // by the full search; every other kid tries the parents of the anchor_window anchors on
  // each side and keeps the closest when its distance is within anchor_slack of that
  // parent's farthest anchor child; the rest fall back to the full search.
  void AnchoredParents(const std::vector<uint32_t>& kids, const std::vector<uint32_t>& parents,
                       int l, std::vector<uint32_t>* parent_of) const {
    const uint32_t d = g.dim;
    std::vector<uint32_t> anchors, anchor_parent;
    for (size_t i = 0; i < kids.size(); i += o.anchor_interval) anchors.push_back(kids[i]);
    FullParents(anchors, parents, l, &anchor_parent);
    if (Cancelled()) return;  // the caller sees it after the level
    // Farthest anchor child of each parent, in lifted distance M - T(c).T(p).
    absl::flat_hash_map<uint32_t, float> max_dist;
    std::vector<float> x(d);
    auto lifted = [&](uint32_t c, uint32_t p) {
      return Dot(x.data(), KeyPtr(p), g.elem_type, d) + Lift(c) * Lift(p);
    };
    for (size_t a = 0; a < anchors.size(); ++a) {
      ToFloat(KeyPtr(anchors[a]), g.elem_type, d, x.data());
      float& m = max_dist[anchor_parent[a]];
      m = std::max(m, M - lifted(anchors[a], anchor_parent[a]));
    }
    parent_of->assign(kids.size(), kNone);
    std::vector<uint32_t> fallback, fallback_at, candidates;
    for (size_t i = 0; i < kids.size(); ++i) {
      const size_t a = i / o.anchor_interval;
      if (i % o.anchor_interval == 0) {
        (*parent_of)[i] = anchor_parent[a];
        continue;
      }
      candidates.clear();
      const size_t lo = a >= o.anchor_window ? a - o.anchor_window : 0;
      const size_t hi = std::min(anchors.size(), a + o.anchor_window + 1);
      for (size_t j = lo; j < hi; ++j) candidates.push_back(anchor_parent[j]);
      std::sort(candidates.begin(), candidates.end());
      candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
      ToFloat(KeyPtr(kids[i]), g.elem_type, d, x.data());
      uint32_t best = kNone;
      float best_v = -std::numeric_limits<float>::infinity();
      for (uint32_t p : candidates) {
        const float v = lifted(kids[i], p);
        if (v > best_v) {
          best_v = v;
          best = p;
        }
      }
      if (best != kNone && M - best_v <= max_dist[best] * o.anchor_slack) {
        (*parent_of)[i] = best;
      } else {
        fallback.push_back(kids[i]);
        fallback_at.push_back(static_cast<uint32_t>(i));
      }
    }
    std::vector<uint32_t> fallback_parent;
    FullParents(fallback, parents, l, &fallback_parent);
    for (size_t f = 0; f < fallback.size(); ++f) (*parent_of)[fallback_at[f]] = fallback_parent[f];
  }

  // The parent search's parameters: the paper's, or the beam (parent_beam > 0).
  uint32_t ExactParentMax() const { return o.parent_beam > 0 ? 64 : o.exact_parent_max; }
  uint32_t BuildFov() const { return o.parent_beam > 0 ? o.parent_beam : o.build_fov; }
  double BuildRatio() const { return o.parent_beam > 0 ? 1.0 : o.build_retrieve_ratio; }
  uint32_t InsertFov() const {
    if (o.parent_beam == 0) return o.insert_fov;
    return o.insert_beam > 0 ? o.insert_beam : o.parent_beam;
  }
  double InsertRatio() const { return o.parent_beam > 0 ? 1.0 : o.insert_retrieve_ratio; }

  bool Cancelled() const {
    return cancel_flag != nullptr && cancel_flag->load(std::memory_order_relaxed);
  }

  absl::Status BuildLocked(const KeyBatch& b, PageWriter* writer) {
    const uint32_t n = b.keys.rows;
    batch = &b;
    cancel_flag = b.cancel;
    batch_begin = 0;
    position.assign(b.positions, b.positions + n);
    level.resize(n);
    page_of.assign(n, kNone);
    slot_of.assign(n, 0);
    sq.resize(n);
    M = 0;
    for (uint32_t t = 0; t < n; ++t) {
      sq[t] = SquaredNorm(b.keys.row(t), g.elem_type, g.dim);
      M = std::max(M, sq[t]);
    }
    std::vector<std::vector<uint32_t>> by_level(kMaxLevels);
    for (uint32_t t = 0; t < n; ++t) {
      const int l = AssignLevel();
      level[t] = static_cast<uint8_t>(l);
      by_level[l].push_back(t);
      top = std::max(top, l);
    }
    for (int l = 1; l <= top; ++l) level_tokens[l] = by_level[l];
    upper_row.assign(n, kNone);
    for (int l = 1; l <= top; ++l) {
      for (uint32_t t : by_level[l]) {
        upper_row[t] = static_cast<uint32_t>(upper_keys.size() / row_bytes);
        const uint8_t* src = static_cast<const uint8_t*>(b.keys.row(t));
        upper_keys.insert(upper_keys.end(), src, src + row_bytes);
      }
    }
    if (o.parent_beam > 0) BeamLayoutBegin(by_level[top]);

    // Root cell: the top level, projected and sorted.
    root_cell = NewCell(kNone, top);
    std::vector<uint32_t> cell_order = {root_cell};
    auto fill_cell = [&](uint32_t cid, absl::Span<const uint32_t> members) {
      Cell& c = cells[cid];
      c.max_sq = 0;
      for (uint32_t t : members) c.max_sq = std::max(c.max_sq, sq[t]);
      c.tok.assign(members.begin(), members.end());
      OrderCell(c);
    };
    fill_cell(root_cell, by_level[top]);

    // Parents level by level, top-down; each level's cells exist before the next one's
    // parents are searched through them.
    std::vector<uint32_t> parent_of;
    std::vector<uint32_t> parent_index(top > 0 ? n : 0, kNone);  // token -> index in parents
    for (int l = top - 1; l >= 0; --l) {
      const std::vector<uint32_t>& kids = by_level[l];
      const std::vector<uint32_t>& parents = by_level[l + 1];
      if (o.anchor_interval > 0 && kids.size() > ExactParentMax()) {
        AnchoredParents(kids, parents, l, &parent_of);
      } else {
        FullParents(kids, parents, l, &parent_of);
      }
      if (Cancelled()) {
        cancel_flag = nullptr;
        return absl::CancelledError("the index build was cancelled");
      }
      // Group children by parent (a counting sort, kids in their order), in the parents'
      // token order.
      for (uint32_t j = 0; j < parents.size(); ++j) parent_index[parents[j]] = j;
      std::vector<uint32_t> start(parents.size() + 1, 0), grouped(kids.size());
      for (size_t i = 0; i < kids.size(); ++i) ++start[parent_index[parent_of[i]] + 1];
      for (size_t j = 0; j < parents.size(); ++j) start[j + 1] += start[j];
      {
        std::vector<uint32_t> at(start.begin(), start.end() - 1);
        for (size_t i = 0; i < kids.size(); ++i)
          grouped[at[parent_index[parent_of[i]]]++] = kids[i];
      }
      for (uint32_t j = 0; j < parents.size(); ++j) {
        if (start[j + 1] == start[j]) continue;
        const absl::Span<const uint32_t> members(grouped.data() + start[j],
                                                 start[j + 1] - start[j]);
        const uint32_t p = parents[j];
        const uint32_t cid = NewCell(p, l);
        fill_cell(cid, members);
        cell_order.push_back(cid);
        if (o.parent_beam > 0 && l >= 1)
          beam_child[beam_row_of[upper_row[p]]] = BeamAppend(members);
      }
    }
    if (cell_refs) {
      for (uint32_t cid = 0; cid < cells.size(); ++cid) {
        if (cid % 64 == 0 && Cancelled()) {
          cancel_flag = nullptr;
          return absl::CancelledError("the index build was cancelled");
        }
        RecenterCell(cid);
      }
    }
    std::vector<uint8_t>().swap(upper_keys);
    std::vector<uint32_t>().swap(upper_row);
    std::vector<uint8_t>().swap(beam_rows);
    std::vector<float>().swap(beam_lift);
    std::vector<uint32_t>().swap(beam_tok);
    std::vector<std::pair<uint32_t, uint32_t>>().swap(beam_child);
    std::vector<uint32_t>().swap(beam_row_of);
    // Pages: cell after cell, so that a cluster's pages have consecutive ids.
    for (uint32_t cid : cell_order) ChunkCell(cid);
    EmitChange(writer);
    built = true;
    return absl::OkStatus();
  }

  // ------------------------------------------------------------------ insert
  absl::Status InsertLocked(const KeyBatch& b, PageWriter* writer) {
    const uint32_t m = b.keys.rows;
    const uint32_t n0 = static_cast<uint32_t>(position.size());
    batch = &b;
    batch_begin = n0;
    ReserveFor(position, n0 + m);
    ReserveFor(level, n0 + m);
    ReserveFor(page_of, n0 + m);
    ReserveFor(slot_of, n0 + m);
    ReserveFor(sq, n0 + m);
    position.insert(position.end(), b.positions, b.positions + m);
    level.resize(n0 + m);
    page_of.resize(n0 + m, kNone);
    slot_of.resize(n0 + m, 0);
    sq.resize(n0 + m);
    for (uint32_t i = 0; i < m; ++i) {
      sq[n0 + i] = SquaredNorm(b.keys.row(i), g.elem_type, g.dim);
      M = std::max(M, sq[n0 + i]);
    }
    std::vector<uint32_t> order(m);
    for (uint32_t i = 0; i < m; ++i) {
      const int l = AssignLevel();
      level[n0 + i] = static_cast<uint8_t>(l);
      order[i] = n0 + i;
    }
    // Upper levels first: a new parent must exist before the new children look for one.
    std::stable_sort(order.begin(), order.end(),
                     [&](uint32_t x, uint32_t y) { return level[x] > level[y]; });
    std::vector<Cand> found;
    for (uint32_t t : order) {
      const int l = level[t];
      if (l > top) {
        // A new top level: t becomes the root and adopts the old root cell.
        ICECACHE_CHECK(l == top + 1) << "level jumped from " << top << " to " << l;
        const uint32_t old_root = root_cell;
        cells[old_root].owner = t;
        child_cell[t] = old_root;
        top = l;
        root_cell = NewCell(kNone, top);
        level_tokens[l].push_back(t);
        CellInsert(root_cell, t);
        continue;
      }
      if (l >= 1) level_tokens[l].push_back(t);
      if (l == top) {
        CellInsert(root_cell, t);
      } else {
        NearestOnLevel(t, l + 1, 1, InsertFov(), InsertRatio(), &found);
        ICECACHE_CHECK(!found.empty()) << "no parent for token " << t << " on level " << l + 1;
        const uint32_t p = found.front().tok;
        auto it = child_cell.find(p);
        const uint32_t cid = it != child_cell.end() ? it->second : NewCell(p, l);
        CellInsert(cid, t);
      }
      if (l >= 1 && o.reparent_neighbors > 0) Reparent(t);
    }
    EmitChange(writer);
    return absl::OkStatus();
  }

  // t (level >= 1) adopts the children of its nearest same-level tokens that are closer to
  // it than to their parent.
  void Reparent(uint32_t t) {
    const int l = level[t];
    std::vector<Cand> near;
    NearestOnLevel(t, l, o.reparent_neighbors, InsertFov(), InsertRatio(), &near);
    // tw: t's key then w's, so that each member's row is read once for both.
    std::vector<float> tw(2 * uint64_t{g.dim}), dots;
    std::vector<const void*> rows;
    ToFloat(KeyPtr(t), g.elem_type, g.dim, tw.data());
    const float tl = Lift(t);
    uint32_t tcell = kNone;
    for (const Cand& w : near) {
      auto it = child_cell.find(w.tok);
      if (it == child_cell.end()) continue;
      const uint32_t wcell = it->second;
      ToFloat(KeyPtr(w.tok), g.elem_type, g.dim, tw.data() + g.dim);
      const float wl = Lift(w.tok);
      const std::vector<uint32_t>& members = cells[wcell].tok;
      const uint32_t n = static_cast<uint32_t>(members.size());
      rows.resize(n);
      dots.resize(2 * uint64_t{n});
      for (uint32_t i = 0; i < n; ++i) rows[i] = KeyPtr(members[i]);
      DotGatherMulti(tw.data(), 2, rows.data(), n, g.elem_type, g.dim, dots.data(), n);
      std::vector<uint32_t> moving;
      for (uint32_t i = 0; i < n; ++i) {
        const float cl = Lift(members[i]);
        if (dots[i] + tl * cl > dots[n + i] + wl * cl) moving.push_back(members[i]);
      }
      if (moving.empty()) continue;
      if (tcell == kNone) {
        auto own = child_cell.find(t);
        tcell = own != child_cell.end() ? own->second : NewCell(t, l - 1);
      }
      // Largest norm first: the cell's max_sq is then set by the first insert, and the others
      // do not each re-project the whole cell.
      std::stable_sort(moving.begin(), moving.end(),
                       [&](uint32_t a, uint32_t b) { return sq[a] > sq[b]; });
      CellRemoveMany(wcell, moving);
      for (uint32_t c : moving) CellInsert(tcell, c);
    }
  }

  // Turns the flagged pages into a LayoutChange, hands it to the writer, clears the context.
  void EmitChange(PageWriter* writer) {
    LayoutChange change;
    for (uint32_t p : flagged) {
      const uint8_t f = page_flags[p];
      const bool now_allocated = f & 2, now_freed = f & 4;
      if (now_allocated && now_freed) continue;  // born and gone within this change
      if (now_freed) {
        change.freed.push_back(p);
        continue;
      }
      if (now_allocated) change.allocated.push_back(p);
      const Cell& c = cells[pages[p].cell];
      const size_t j = std::find(c.page_ids.begin(), c.page_ids.end(), p) - c.page_ids.begin();
      ICECACHE_CHECK(j < c.page_ids.size()) << "page " << p << " missing from its cell";
      for (uint32_t i = c.PageStart(j); i < c.page_end[j]; ++i) {
        const uint32_t t = c.tok[i];
        SlotWrite w;
        w.page = p;
        w.slot = slot_of[t];
        if (t >= batch_begin) {
          w.src.kind = SlotSource::Kind::kBatch;
          w.src.batch_row = t - batch_begin;
        } else {
          auto it = orig.find(t);
          if (it == orig.end()) continue;  // never moved
          if (it->second.first == p && it->second.second == slot_of[t]) continue;
          w.src.kind = SlotSource::Kind::kExisting;
          w.src.page = it->second.first;
          w.src.slot = it->second.second;
        }
        change.writes.push_back(w);
      }
      change.changed.push_back({p, pages[p].valid});
    }
    std::sort(change.allocated.begin(), change.allocated.end());
    writer->Apply(change);
    for (uint32_t p : flagged) page_flags[p] = 0;
    flagged.clear();
    orig.clear();
    free_pages.insert(free_pages.end(), pending_free.begin(), pending_free.end());
    pending_free.clear();
    batch = nullptr;
    batch_begin = static_cast<uint32_t>(position.size());
  }

  // ------------------------------------------------------------------ search
  // Per-thread state of one search: per (query, page) running statistics of the scaled
  // scores seen (max, and sum of exp(score - max) for the mass ranking), stamped per page.
  struct GroupScratch {
    uint32_t nq = 0;
    std::vector<float> vmax, vsum;  // [query][page]
    std::vector<uint32_t> stamp;    // [page]
    uint32_t cur = 0;
    std::vector<uint32_t> touched;
    std::vector<uint32_t> cand_tok;  // tokens scored on the current level
    std::vector<float> cand_score;   // [candidate][query], scaled
    std::vector<uint32_t> cells, next_cells, cell_stamp;
    uint32_t cell_cur = 0;
    std::vector<std::pair<uint32_t, uint32_t>> ranges;
    std::vector<const void*> rows;
    std::vector<float> tmp, ex;
    std::vector<uint32_t> order;
    uint64_t scored = 0;
    // Best-first search.
    std::vector<float> cell_score;  // [query][cell]: q.ref
    std::vector<float> qnorm;       // [query]
    // One query's cells best bound first (OrderCells), then the page lists' sort keys.
    std::vector<uint64_t> order_keys;
    std::vector<std::vector<float>> kth;  // [query]: min-heap of best values
    // [query]: the RankKey (estimate, token) of each key whose estimate beat cand_floor[query] when
    // it was seen, unordered, in cand[q][0, cand_n[q]); cut back to the best R whenever there are
    // 2 R (CutCandidates), so cand_floor is the R-th best estimate as of the last cut (-inf
    // before the first): never above the R-th best of the keys seen so far.
    std::vector<std::vector<uint64_t>> cand;
    std::vector<uint32_t> cand_n;
    std::vector<float> cand_floor;
    std::vector<uint32_t> opened;  // cells opened, in order
    std::vector<uint32_t> union_tok;
    std::vector<double> page_share, page_mass;  // RerankByMass: [candidate]
    std::vector<uint64_t> union_bits;           // [token / 64]: all clear between searches
    std::vector<int32_t> dots;
    std::vector<uint8_t> luts;                   // [query][bits * 4]: fast-scan tables
    std::vector<int32_t> lut_bias;               // [query]
    std::vector<ResidualSketch::Query> qsketch;  // [query] prepared for SketchDotsPacked
    uint64_t sketched = 0;

    void Begin(uint32_t queries, size_t page_limit, size_t cell_limit) {
      nq = queries;
      if (stamp.size() < page_limit) stamp.resize(page_limit, 0);
      // Query j's statistics start at j * stamp.size() (Max/Sum), and stamp may be larger than
      // this tree's page_limit (the scratch is per thread, shared by every tree it searches).
      const size_t need = size_t{nq} * stamp.size();
      if (vmax.size() < need) {
        vmax.resize(need);
        vsum.resize(need);
      }
      if (cell_stamp.size() < cell_limit) cell_stamp.resize(cell_limit, 0);
      if (++cur == 0) {
        std::fill(stamp.begin(), stamp.end(), 0);
        cur = 1;
      }
      touched.clear();
      scored = 0;
    }
    float* Max(uint32_t j) { return vmax.data() + j * stamp.size(); }
    float* Sum(uint32_t j) { return vsum.data() + j * stamp.size(); }
    void Touch(uint32_t p) {
      if (stamp[p] != cur) {
        stamp[p] = cur;
        touched.push_back(p);
        for (uint32_t j = 0; j < nq; ++j) {
          Max(j)[p] = -std::numeric_limits<float>::infinity();
          Sum(j)[p] = 0;
        }
      }
    }
    // Adds one token's scaled score for query j (exp only in mass mode).
    void Add(uint32_t j, uint32_t p, float v, bool mass) {
      float& m = Max(j)[p];
      if (!mass) {
        m = std::max(m, v);
      } else if (v > m) {
        Sum(j)[p] = Sum(j)[p] * std::exp(m - v) + 1.f;
        m = v;
      } else {
        Sum(j)[p] += std::exp(v - m);
      }
    }
  };

  static GroupScratch& ThreadGroupScratch() {
    thread_local GroupScratch s;
    return s;
  }

  // The share of cell c a query scores: a run around qp of at least `r` tokens, as token
  // indices [lo, hi) into the cell; or, page-granular, as page indices [plo, phi).
  static void TokenRun(const Cell& c, float qp, uint32_t r, uint32_t* lo, uint32_t* hi) {
    const uint32_t n = static_cast<uint32_t>(c.tok.size());
    if (r >= n) {
      *lo = 0;
      *hi = n;
      return;
    }
    uint32_t a =
        static_cast<uint32_t>(std::lower_bound(c.proj.begin(), c.proj.end(), qp) - c.proj.begin());
    uint32_t b = a;
    while (b - a < r) {
      if (a == 0) {
        b = a + r;
      } else if (b == n) {
        a = b - r;
      } else if (qp - c.proj[a - 1] <= c.proj[b] - qp) {
        --a;
      } else {
        ++b;
      }
    }
    *lo = a;
    *hi = b;
  }

  void PageRun(const Cell& c, float qp, uint32_t r, uint32_t* plo, uint32_t* phi) const {
    const uint32_t np = static_cast<uint32_t>(c.page_ids.size());
    const uint32_t n = static_cast<uint32_t>(c.tok.size());
    if (r >= n) {
      *plo = 0;
      *phi = np;
      return;
    }
    const uint32_t at =
        static_cast<uint32_t>(std::lower_bound(c.proj.begin(), c.proj.end(), qp) - c.proj.begin());
    uint32_t a = static_cast<uint32_t>(
        std::upper_bound(c.page_end.begin(), c.page_end.end(), std::min(at, n - 1)) -
        c.page_end.begin());
    uint32_t b = a + 1;
    uint32_t covered = pages[c.page_ids[a]].valid;
    while (covered < r) {
      // Take the neighbouring page whose nearest key is closer in projection.
      const bool left_ok = a > 0, right_ok = b < np;
      bool take_left;
      if (!right_ok) {
        take_left = true;
      } else if (!left_ok) {
        take_left = false;
      } else {
        take_left = qp - c.proj[c.page_end[a - 1] - 1] <= c.proj[c.PageStart(b)] - qp;
      }
      if (take_left) {
        --a;
        covered += pages[c.page_ids[a]].valid;
      } else {
        covered += pages[c.page_ids[b]].valid;
        ++b;
      }
    }
    *plo = a;
    *phi = b;
  }

  // Merges intervals in gs.ranges in place (sorted, overlapping ones joined).
  static void UnionRanges(std::vector<std::pair<uint32_t, uint32_t>>* r) {
    std::sort(r->begin(), r->end());
    size_t w = 0;
    for (size_t i = 0; i < r->size(); ++i) {
      if (w > 0 && (*r)[i].first <= (*r)[w - 1].second) {
        (*r)[w - 1].second = std::max((*r)[w - 1].second, (*r)[i].second);
      } else {
        (*r)[w++] = (*r)[i];
      }
    }
    r->resize(w);
  }

  // Scores page p (all its slots) for the nq queries; records page statistics and, when
  // `collect`, the tokens of cell-page j as candidates.
  void ScorePage(const float* qs, const Cell& c, uint32_t j, bool collect, GroupScratch& gs) const {
    const uint32_t p = c.page_ids[j];
    const uint32_t valid = pages[p].valid;
    const uint32_t nq = gs.nq;
    const float scale = 1.0f / std::sqrt(static_cast<float>(g.dim));
    const bool mass = o.page_score == DciOptions::PageScore::kSoftmaxMass;
    gs.tmp.resize(uint64_t{nq} * g.page_size);
    DotStridedMulti(qs, nq, reader->PageKeys(p), row_bytes, valid, g.elem_type, g.dim,
                    gs.tmp.data(), g.page_size);
    gs.scored += uint64_t{valid} * nq;  // dot products
    gs.Touch(p);
    for (uint32_t q = 0; q < nq; ++q) {
      float* v = gs.tmp.data() + uint64_t{q} * g.page_size;
      float m = -std::numeric_limits<float>::infinity();
      for (uint32_t s = 0; s < valid; ++s) {
        v[s] *= scale;
        m = std::max(m, v[s]);
      }
      gs.Max(q)[p] = m;
      if (mass) {
        gs.ex.assign(v, v + valid);
        for (float& x : gs.ex) x -= m;
        ExpInPlace(gs.ex.data(), valid);
        float sum = 0;
        for (float x : gs.ex) sum += x;
        gs.Sum(q)[p] = sum;
      }
    }
    if (collect) {
      for (uint32_t i = c.PageStart(j); i < c.page_end[j]; ++i) {
        const uint32_t t = c.tok[i];
        gs.cand_tok.push_back(t);
        for (uint32_t q = 0; q < nq; ++q) {
          gs.cand_score.push_back(gs.tmp[uint64_t{q} * g.page_size + slot_of[t]]);
        }
      }
    }
  }

  // One beam descent for `nq` queries at once (nq == 1 is the paper's per-query search).
  void DescendQueries(const float* qs, uint32_t nq, uint32_t k, GroupScratch& gs) const {
    const uint32_t d = g.dim;
    const uint32_t n_tokens = static_cast<uint32_t>(position.size());
    const uint32_t fov =
        std::max<uint32_t>(static_cast<uint32_t>(std::ceil(o.fov_ratio * n_tokens)), o.min_fov);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    const bool mass = o.page_score == DciOptions::PageScore::kSoftmaxMass;
    std::vector<float> dir(nq);
    for (uint32_t q = 0; q < nq; ++q) {
      double norm = 0, dp = 0;
      for (uint32_t i = 0; i < d; ++i) {
        norm += double(qs[q * d + i]) * qs[q * d + i];
        dp += double(u[i]) * qs[q * d + i];
      }
      dir[q] = norm > 0 ? static_cast<float>(dp / std::sqrt(norm)) : 0.f;
    }
    auto qproj = [&](uint32_t q, const Cell& c) {
      return o.scale_query_projection ? std::sqrt(c.max_sq) * dir[q] : dir[q];
    };
    gs.cells.assign(1, root_cell);
    for (int lvl = top;; --lvl) {
      const bool collect = lvl > 0;
      gs.cand_tok.clear();
      gs.cand_score.clear();
      const uint32_t want = lvl == 0 ? k : fov;
      for (uint32_t cid : gs.cells) {
        const Cell& c = cells[cid];
        const uint32_t n = static_cast<uint32_t>(c.tok.size());
        if (n == 0) continue;
        const uint32_t r = std::min<uint32_t>(
            n,
            std::max<uint32_t>(static_cast<uint32_t>(std::ceil(o.query_retrieve_ratio * n)), want));
        gs.ranges.clear();
        for (uint32_t q = 0; q < nq; ++q) {
          uint32_t a, b;
          if (o.page_granular_scoring) {
            PageRun(c, qproj(q, c), r, &a, &b);
          } else {
            TokenRun(c, qproj(q, c), r, &a, &b);
          }
          gs.ranges.push_back({a, b});
        }
        UnionRanges(&gs.ranges);
        for (const auto& [a, b] : gs.ranges) {
          if (o.page_granular_scoring) {
            for (uint32_t j = a; j < b; ++j) ScorePage(qs, c, j, collect, gs);
            continue;
          }
          const uint32_t m = b - a;
          gs.rows.resize(m);
          for (uint32_t i = 0; i < m; ++i) gs.rows[i] = KeyPtr(c.tok[a + i]);
          gs.tmp.resize(uint64_t{nq} * m);
          DotGatherMulti(qs, nq, gs.rows.data(), m, g.elem_type, d, gs.tmp.data(), m);
          gs.scored += uint64_t{m} * nq;
          for (uint32_t i = 0; i < m; ++i) {
            const uint32_t t = c.tok[a + i];
            const uint32_t p = page_of[t];
            gs.Touch(p);
            if (collect) gs.cand_tok.push_back(t);
            for (uint32_t q = 0; q < nq; ++q) {
              const float v = gs.tmp[uint64_t{q} * m + i] * scale;
              gs.Add(q, p, v, mass);
              if (collect) gs.cand_score.push_back(v);
            }
          }
        }
      }
      if (lvl == 0 || gs.cand_tok.empty()) break;
      // Next beam: each query's best FOV tokens (extended to cover k pages below when the
      // next level is the last); the union of their child cells.
      if (++gs.cell_cur == 0) {
        std::fill(gs.cell_stamp.begin(), gs.cell_stamp.end(), 0);
        gs.cell_cur = 1;
      }
      gs.next_cells.clear();
      const size_t nc = gs.cand_tok.size();
      for (uint32_t q = 0; q < nq; ++q) {
        gs.order.resize(nc);
        std::iota(gs.order.begin(), gs.order.end(), 0u);
        auto better = [&](uint32_t x, uint32_t y) {
          const float sx = gs.cand_score[uint64_t{x} * nq + q],
                      sy = gs.cand_score[uint64_t{y} * nq + q];
          return sx > sy || (sx == sy && gs.cand_tok[x] < gs.cand_tok[y]);
        };
        const uint32_t width = lvl == 1 && o.final_fov > 0 ? o.final_fov : fov;
        size_t take = std::min<size_t>(width, nc);
        std::partial_sort(gs.order.begin(), gs.order.begin() + take, gs.order.end(), better);
        if (lvl == 1) {
          uint64_t covered = 0;
          for (size_t i = 0; i < take; ++i) covered += ChildPages(gs.cand_tok[gs.order[i]]);
          if (covered < k && take < nc) {
            std::sort(gs.order.begin() + take, gs.order.end(), better);
            while (covered < k && take < nc) covered += ChildPages(gs.cand_tok[gs.order[take++]]);
          }
        }
        for (size_t i = 0; i < take; ++i) {
          auto it = child_cell.find(gs.cand_tok[gs.order[i]]);
          if (it == child_cell.end() || cells[it->second].tok.empty()) continue;
          if (gs.cell_stamp[it->second] == gs.cell_cur) continue;
          gs.cell_stamp[it->second] = gs.cell_cur;
          gs.next_cells.push_back(it->second);
        }
      }
      if (gs.next_cells.empty()) break;
      gs.cells.swap(gs.next_cells);
    }
    // Rare (tiny or skewed trees): fewer pages reached than asked for; score the rest whole.
    if (gs.touched.size() < k) {
      for (uint32_t cid = 0; cid < cells.size(); ++cid) {
        const Cell& c = cells[cid];
        for (uint32_t j = 0; j < c.page_ids.size(); ++j) {
          if (gs.stamp[c.page_ids[j]] != gs.cur) ScorePage(qs, c, j, false, gs);
        }
      }
    }
  }

  // The page value of query q: its scaled log-mass estimate (mass mode) or best scaled score.
  float PageValue(const GroupScratch& gs, uint32_t q, uint32_t p) const {
    const float m = const_cast<GroupScratch&>(gs).Max(q)[p];
    if (o.page_score != DciOptions::PageScore::kSoftmaxMass) return m;
    return m + std::log(std::max(const_cast<GroupScratch&>(gs).Sum(q)[p], 1e-30f));
  }

  // Per query: every touched page with its value.
  using PageValues = std::vector<std::pair<uint32_t, float>>;
  void CollectValues(const GroupScratch& gs, uint32_t nq, std::vector<PageValues>* out) const {
    for (uint32_t q = 0; q < nq; ++q) {
      PageValues pv;
      pv.reserve(gs.touched.size());
      for (uint32_t p : gs.touched) pv.push_back({p, PageValue(gs, q, p)});
      out->push_back(std::move(pv));
    }
  }

  // ------------------------------------------------------------------ best-first search
  // The bound of every cell for every query: bounds[c] = q.ref + slack |q| R (+ a rounding
  // margin), -inf for empty cells. Fills gs.cell_score and gs.qnorm.
  void CellScores(const float* qs, uint32_t nq, GroupScratch& gs) const {
    const uint32_t nc = static_cast<uint32_t>(cells.size());
    gs.cell_score.resize(uint64_t{nq} * nc);
    DotStridedMulti(qs, nq, cell_ref.data(), uint64_t{g.dim} * 2, nc, ElemType::kBF16, g.dim,
                    gs.cell_score.data(), nc);
    gs.qnorm.resize(nq);
    for (uint32_t j = 0; j < nq; ++j) {
      double n2 = 0;
      for (uint32_t i = 0; i < g.dim; ++i)
        n2 += double(qs[uint64_t{j} * g.dim + i]) * qs[uint64_t{j} * g.dim + i];
      gs.qnorm[j] = static_cast<float>(std::sqrt(n2));
    }
  }

  // Query j's (bound, cell) over the non-empty cells not opened yet (by an earlier query of
  // the group) into gs.order_keys, best bound first (ties: the higher cell id first), each as
  // OrderedFloatBits(bound) << 32 | cell. Sorted once: the search visits most cells of a large
  // tree, so a heap popped cell by cell costs more.
  void OrderCells(uint32_t j, GroupScratch& gs) const {
    const uint32_t nc = static_cast<uint32_t>(cells.size());
    const float* cs = gs.cell_score.data() + uint64_t{j} * nc;
    const float qn = gs.qnorm[j];
    gs.order_keys.clear();
    for (uint32_t c = 0; c < nc; ++c) {
      if (cells[c].tok.empty() || gs.cell_stamp[c] == gs.cell_cur) continue;
      // Rounding margin: the kernels' float error on q.ref and on the keys' scores.
      const float margin = 1e-5f * qn * (cell_ref_norm[c] + cell_radius[c]) + 1e-6f;
      float bound = cs[c] + o.cell_bound_slack * qn * cell_radius[c] + margin;
      // A query of huge finite values can overflow a score to inf and the bound to NaN; such a
      // cell is opened (its bound taken as +inf).
      if (std::isnan(bound)) bound = std::numeric_limits<float>::infinity();
      gs.order_keys.push_back(uint64_t{OrderedFloatBits(bound)} << 32 | c);
    }
    // Sorted as integers (bound, then cell id, both descending): one comparison each.
    std::sort(gs.order_keys.begin(), gs.order_keys.end(), std::greater<>());
  }

  // Pushes v into a min-heap of at most `cap` values.
  static void PushBest(std::vector<float>* h, uint32_t cap, float v) {
    if (h->size() < cap) {
      h->push_back(v);
      std::push_heap(h->begin(), h->end(), std::greater<float>());
    } else if (v > h->front()) {
      std::pop_heap(h->begin(), h->end(), std::greater<float>());
      h->back() = v;
      std::push_heap(h->begin(), h->end(), std::greater<float>());
    }
  }

  // Scores every page of cell cid exactly for the group (the exact scan's kernel and call, so
  // the same floats): per (query, page) best key in gs.Max, and each query's best-k heap.
  void OpenCellExact(const float* qs, uint32_t cid, uint32_t k, GroupScratch& gs) const {
    const Cell& c = cells[cid];
    const uint32_t nq = gs.nq;
    gs.tmp.resize(uint64_t{nq} * g.page_size);
    for (uint32_t j = 0; j < c.page_ids.size(); ++j) {
      const uint32_t p = c.page_ids[j];
      const uint32_t valid = pages[p].valid;
      DotStridedMulti(qs, nq, reader->PageKeys(p), row_bytes, valid, g.elem_type, g.dim,
                      gs.tmp.data(), g.page_size);
      gs.scored += uint64_t{valid} * nq;
      gs.Touch(p);
      for (uint32_t q = 0; q < nq; ++q) {
        const float* v = gs.tmp.data() + uint64_t{q} * g.page_size;
        float m = -std::numeric_limits<float>::infinity();
        for (uint32_t s = 0; s < valid; ++s) m = std::max(m, v[s]);
        gs.Max(q)[p] = m;
        PushBest(&gs.kth[q], k, m);
      }
    }
  }

  // Estimates every key of cell cid for the group from its sketches; appends those above each
  // query's floor to its candidates.
  void OpenCellSketch(uint32_t cid, uint32_t rcap, GroupScratch& gs) const {
    const Cell& c = cells[cid];
    const uint32_t nq = gs.nq;
    const uint32_t n = static_cast<uint32_t>(c.tok.size());
    const uint32_t nc = static_cast<uint32_t>(cells.size());
    if (gs.dots.size() < uint64_t{nq} * n) gs.dots.resize(uint64_t{nq} * n);
    SketchDotsPacked(gs.luts.data(), gs.lut_bias.data(), nq, sketch->bits(), c.code.data(), n,
                     gs.dots.data(), n);
    gs.sketched += uint64_t{n} * nq;
    // Per query: the estimates (SIMD, F16C factors; ResidualSketch::Estimate plus q.r) and the
    // keys above the query's floor appended as candidate keys, cut back to the best R when
    // they reach 2 R: about one selection per R keys that beat the floor, where a heap of R
    // paid a sift per key.
    for (uint32_t q = 0; q < nq; ++q) {
      const float base = gs.cell_score[uint64_t{q} * nc + cid];
      const ResidualSketch::Query& qs8 = gs.qsketch[q];
      std::vector<uint64_t>& h = gs.cand[q];
      if (h.size() < uint64_t{gs.cand_n[q]} + n) h.resize(uint64_t{gs.cand_n[q]} + n);
      gs.cand_n[q] += SketchCandidatesAbove(gs.dots.data() + uint64_t{q} * n, c.fac.data(),
                                            c.tok.data(), n, base, qs8.scale, qs8.sum,
                                            gs.cand_floor[q], h.data() + gs.cand_n[q]);
      if (gs.cand_n[q] >= 2 * uint64_t{rcap}) CutCandidates(q, rcap, gs);
    }
  }

  // Keeps query q's best rcap candidates (estimate descending, ties to the lower token: the
  // larger key) and raises its floor to the rcap-th estimate (later keys must beat it
  // strictly). Every key estimated above the final floor is kept whatever order the cells were
  // opened in (the floor never passes it); only ties at the floor depend on that order, as
  // with a heap.
  static void CutCandidates(uint32_t q, uint32_t rcap, GroupScratch& gs) {
    uint64_t* h = gs.cand[q].data();
    if (gs.cand_n[q] < rcap) return;
    std::nth_element(h, h + (rcap - 1), h + gs.cand_n[q], std::greater<uint64_t>());
    gs.cand_n[q] = rcap;
    gs.cand_floor[q] = RankKeyValue(h[rcap - 1]);
  }

  // DciOptions::rerank_extra_pages: scores every key of the candidate pages in `out` for the group
  // and keeps the k of the largest summed softmax-mass share (ties to the lower page id); a
  // page's score becomes its share.
  void RerankByMass(const float* qs, uint32_t nq, uint32_t k, GroupScratch& gs,
                    std::vector<SelectedPage>* out) const {
    const uint32_t n = static_cast<uint32_t>(out->size());
    if (n == 0) return;
    const uint32_t ps = g.page_size;
    const uint64_t len = uint64_t{n} * ps;  // one query's slots
    const float scale = 1.0f / std::sqrt(static_cast<float>(g.dim));
    // ex[q * len + i * ps + s]: the score of slot s of candidate i for query q, written there by
    // the kernel; the slots past a page's valid tokens -inf.
    gs.ex.resize(uint64_t{nq} * len);
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t p = (*out)[i].page;
      const uint32_t valid = pages[p].valid;
      DotStridedMulti(qs, nq, reader->PageKeys(p), row_bytes, valid, g.elem_type, g.dim,
                      gs.ex.data() + uint64_t{i} * ps, len);
      gs.scored += uint64_t{valid} * nq;
      for (uint32_t q = 0; q < nq; ++q) {
        float* slot = gs.ex.data() + q * len + uint64_t{i} * ps;
        std::fill(slot + valid, slot + ps, -std::numeric_limits<float>::infinity());
      }
    }
    std::vector<double>& share = gs.page_share;
    std::vector<double>& mass = gs.page_mass;
    share.assign(n, 0.0);
    mass.resize(n);
    for (uint32_t q = 0; q < nq; ++q) {
      float* v = gs.ex.data() + q * len;
      // Scaled, and shifted by the query's best scaled score (the same roundings as one
      // multiply and one subtract per slot); -inf stays -inf.
      float best = -std::numeric_limits<float>::infinity();
      for (uint64_t x = 0; x < len; ++x) {
        v[x] *= scale;
        best = std::max(best, v[x]);
      }
      for (uint64_t x = 0; x < len; ++x) v[x] -= best;
      ExpInPlace(v, static_cast<uint32_t>(len));
      // Each page's mass summed slot by slot in double (slot 0 first), the pages side by side.
      std::fill(mass.begin(), mass.end(), 0.0);
      for (uint32_t s = 0; s < ps; ++s) {
        for (uint32_t i = 0; i < n; ++i) mass[i] += v[uint64_t{i} * ps + s];
      }
      double total = 0;
      for (uint32_t i = 0; i < n; ++i) total += mass[i];
      if (total > 0) {
        for (uint32_t i = 0; i < n; ++i) share[i] += mass[i] / total;
      }
    }
    for (uint32_t i = 0; i < n; ++i) (*out)[i].score = static_cast<float>(share[i]);
    auto by_share = [](const SelectedPage& a, const SelectedPage& b) {
      return a.score > b.score || (a.score == b.score && a.page < b.page);
    };
    const uint32_t kk = std::min(k, n);
    std::partial_sort(out->begin(), out->begin() + kk, out->end(), by_share);
    out->resize(kk);
  }

  void SearchBestFirst(const float* qs, uint32_t nq, uint32_t k,
                       std::vector<SelectedPage>* out) const {
    GroupScratch& gs = ThreadGroupScratch();
    gs.Begin(nq, pages.size(), cells.size());
    gs.sketched = 0;
    gs.opened.clear();
    if (++gs.cell_cur == 0) {
      std::fill(gs.cell_stamp.begin(), gs.cell_stamp.end(), 0);
      gs.cell_cur = 1;
    }
    CellScores(qs, nq, gs);
    const bool exact = !sketching;
    // The best k + rerank_extra_pages pages (at most every page; never fewer than k) are the
    // candidates of the ranking below. A query's list can only hold pages with one of its
    // rescored keys, so it rescores at least as many keys as it must nominate pages.
    const uint32_t want = static_cast<uint32_t>(std::max<uint64_t>(
        k, std::min<uint64_t>(uint64_t{k} + o.rerank_extra_pages, pages.size())));
    const uint32_t rcap = std::max<uint32_t>({o.rescore_tokens, want, 1u});
    gs.kth.resize(nq);
    gs.cand.resize(nq);
    gs.cand_n.assign(nq, 0);
    gs.cand_floor.assign(nq, -std::numeric_limits<float>::infinity());
    for (uint32_t q = 0; q < nq; ++q) {
      gs.kth[q].clear();
    }
    if (!exact) {
      gs.qsketch.resize(nq);
      const uint64_t lut_bytes = uint64_t{sketch->bits()} * 4;
      gs.luts.resize(nq * lut_bytes);
      gs.lut_bias.resize(nq);
      std::vector<float>& buf = SketchBuffer();
      for (uint32_t q = 0; q < nq; ++q) {
        sketch->Prepare(qs + uint64_t{q} * g.dim, &gs.qsketch[q], buf.data());
        std::copy(gs.qsketch[q].lut.begin(), gs.qsketch[q].lut.end(),
                  gs.luts.begin() + q * lut_bytes);
        gs.lut_bias[q] = gs.qsketch[q].lut_bias;
      }
    }
    // Each query opens cells best bound first until no unopened cell's bound reaches its
    // threshold (the k-th best page, or the R-th best estimate); a cell opened for one query
    // serves them all.
    for (uint32_t q = 0; q < nq; ++q) {
      OrderCells(q, gs);
      for (const uint64_t key : gs.order_keys) {
        const float bound = FromOrderedFloatBits(static_cast<uint32_t>(key >> 32));
        const uint32_t cid = static_cast<uint32_t>(key);
        if (exact) {
          if (gs.kth[q].size() >= k && bound < gs.kth[q].front()) break;
        } else if (bound < gs.cand_floor[q]) {
          // The floor as of the last cut: at most the R-th best estimate so far, so the
          // search stops no earlier than at the exact R-th best (it may open a few cells more).
          break;
        }
        gs.cell_stamp[cid] = gs.cell_cur;
        gs.opened.push_back(cid);
        if (exact) {
          OpenCellExact(qs, cid, k, gs);
        } else {
          OpenCellSketch(cid, rcap, gs);
        }
      }
    }
    if (!exact) {
      // Rescore the union of the queries' best estimates exactly, for the whole group: each
      // token once (a bit per token, cleared again after), in the order first met (a row's
      // exact score does not depend on its place in the gather).
      gs.union_tok.clear();
      if (gs.union_bits.size() * 64 < page_of.size())
        gs.union_bits.resize(page_of.size() / 64 + 1, 0);
      for (uint32_t q = 0; q < nq; ++q) {
        CutCandidates(q, rcap, gs);
        for (uint32_t i = 0; i < gs.cand_n[q]; ++i) {
          const uint32_t t = RankKeyId(gs.cand[q][i]);
          uint64_t& w = gs.union_bits[t / 64];
          const uint64_t bit = uint64_t{1} << (t % 64);
          if ((w & bit) == 0) {
            w |= bit;
            gs.union_tok.push_back(t);
          }
        }
      }
      for (uint32_t t : gs.union_tok) gs.union_bits[t / 64] = 0;
      const uint32_t m = static_cast<uint32_t>(gs.union_tok.size());
      gs.rows.resize(m);
      for (uint32_t i = 0; i < m; ++i) gs.rows[i] = KeyPtr(gs.union_tok[i]);
      gs.tmp.resize(uint64_t{nq} * m);
      DotGatherMulti(qs, nq, gs.rows.data(), m, g.elem_type, g.dim, gs.tmp.data(), m);
      gs.scored += uint64_t{m} * nq;
      for (uint32_t i = 0; i < m; ++i) {
        const uint32_t p = page_of[gs.union_tok[i]];
        gs.Touch(p);
        for (uint32_t q = 0; q < nq; ++q) {
          float& mx = gs.Max(q)[p];
          mx = std::max(mx, gs.tmp[uint64_t{q} * m + i]);
        }
      }
    }
    tls_last_sketched = gs.sketched;
    tls_last_cells_opened = static_cast<uint32_t>(gs.opened.size());
    // Per query: its best `want` pages among those scored; merged rank-interleaved.
    std::vector<std::vector<SelectedPage>> lists(nq);
    for (uint32_t q = 0; q < nq; ++q) {
      // The best `want` by value (ties to the lower page) as integer keys: one comparison each.
      const float* mx = gs.Max(q);
      std::vector<uint64_t>& pk = gs.order_keys;
      pk.resize(gs.touched.size());
      for (size_t i = 0; i < pk.size(); ++i) {
        const uint32_t p = gs.touched[i];
        pk[i] = RankKey(mx[p], p);
      }
      const size_t kk = std::min<size_t>(want, pk.size());
      if (kk < pk.size()) std::nth_element(pk.begin(), pk.begin() + kk, pk.end(), std::greater<>());
      std::sort(pk.begin(), pk.begin() + kk, std::greater<>());
      lists[q].resize(kk);
      for (size_t i = 0; i < kk; ++i) {
        const uint32_t p = RankKeyId(pk[i]);
        lists[q][i] = {p, pages[p].valid, RankKeyValue(pk[i])};
      }
    }
    *out = nq == 1 ? std::move(lists[0]) : MergeRankInterleaved(lists, want);
    if (o.rerank_extra_pages > 0) RerankByMass(qs, nq, k, gs, out);
    tls_last_scored = gs.scored;
    if (out->size() < k) {
      // Fewer pages scored than asked for (tiny trees): complete with the pages of the opened
      // cells, then of any cell, unranked (score: -inf).
      std::vector<uint32_t> have;
      for (const SelectedPage& sp : *out) have.push_back(sp.page);
      std::sort(have.begin(), have.end());
      auto add_cell = [&](uint32_t cid) {
        for (uint32_t p : cells[cid].page_ids) {
          if (out->size() >= k) return;
          if (std::binary_search(have.begin(), have.end(), p)) continue;
          out->push_back({p, pages[p].valid, -std::numeric_limits<float>::infinity()});
        }
      };
      for (uint32_t cid : gs.opened) add_cell(cid);
      for (uint32_t cid = 0; cid < cells.size() && out->size() < k; ++cid) {
        if (gs.cell_stamp[cid] != gs.cell_cur) add_cell(cid);
      }
    }
  }

  void SearchGroup(const float* qs, uint32_t nq, uint32_t k, std::vector<SelectedPage>* out) const {
    GroupScratch& gs = ThreadGroupScratch();
    std::vector<PageValues> per_query;
    uint64_t scored = 0;
    tls_last_sketched = 0;
    tls_last_cells_opened = 0;
    if (cell_refs && position.size() > o.exact_search_max_tokens) {
      SearchBestFirst(qs, nq, k, out);
      return;
    }
    if (position.size() <= o.exact_search_max_tokens) {
      gs.Begin(nq, pages.size(), cells.size());
      for (const Cell& c : cells) {
        for (uint32_t j = 0; j < c.page_ids.size(); ++j) ScorePage(qs, c, j, false, gs);
      }
      CollectValues(gs, nq, &per_query);
      scored = gs.scored;
    } else if (o.joint_group_search || nq == 1) {
      gs.Begin(nq, pages.size(), cells.size());
      DescendQueries(qs, nq, k, gs);
      CollectValues(gs, nq, &per_query);
      scored = gs.scored;
    } else {
      for (uint32_t q = 0; q < nq; ++q) {
        gs.Begin(1, pages.size(), cells.size());
        DescendQueries(qs + uint64_t{q} * g.dim, 1, k, gs);
        CollectValues(gs, 1, &per_query);
        scored += gs.scored;
      }
    }
    tls_last_scored = scored;
    auto by_value = [](const SelectedPage& a, const SelectedPage& b) {
      return a.score > b.score || (a.score == b.score && a.page < b.page);
    };
    if (o.group_merge == DciOptions::GroupMerge::kRankInterleaved || nq == 1) {
      std::vector<std::vector<SelectedPage>> lists(nq);
      for (uint32_t q = 0; q < nq; ++q) {
        for (const auto& [p, v] : per_query[q]) lists[q].push_back({p, pages[p].valid, v});
        const size_t kk = std::min<size_t>(k, lists[q].size());
        std::partial_sort(lists[q].begin(), lists[q].begin() + kk, lists[q].end(), by_value);
        lists[q].resize(kk);
      }
      *out = nq == 1 ? std::move(lists[0]) : MergeRankInterleaved(lists, k);
      return;
    }
    // Sum over the group of each query's normalised mass estimate.
    absl::flat_hash_map<uint32_t, float> total;
    for (const PageValues& pv : per_query) {
      float mx = -std::numeric_limits<float>::infinity();
      for (const auto& e : pv) mx = std::max(mx, e.second);
      double z = 0;
      for (const auto& e : pv) z += std::exp(double(e.second) - mx);
      for (const auto& [p, v] : pv) total[p] += static_cast<float>(std::exp(double(v) - mx) / z);
    }
    std::vector<SelectedPage> all;
    all.reserve(total.size());
    for (const auto& [p, v] : total) all.push_back({p, pages[p].valid, v});
    const size_t kk = std::min<size_t>(k, all.size());
    std::partial_sort(all.begin(), all.begin() + kk, all.end(), by_value);
    all.resize(kk);
    *out = std::move(all);
  }
};

// =================================================================== public
DciTree::DciTree(const IndexGeometry& geometry, const DciOptions& options, const PageReader* reader)
    : impl_(std::make_unique<Impl>(geometry, options, reader)), geometry_(geometry) {}

DciTree::~DciTree() = default;

absl::Status DciTree::Build(const KeyBatch& batch, PageWriter* writer) {
  absl::Status valid = ValidateBatch(geometry_, batch);
  if (!valid.ok()) return valid;
  if (writer == nullptr) return absl::InvalidArgumentError("null page writer");
  absl::MutexLock lock(&mu_);
  if (impl_->built) return absl::FailedPreconditionError("index is already built");
  return impl_->BuildLocked(batch, writer);
}

absl::Status DciTree::Insert(const KeyBatch& batch, PageWriter* writer) {
  absl::Status valid = ValidateBatch(geometry_, batch);
  if (!valid.ok()) return valid;
  if (writer == nullptr) return absl::InvalidArgumentError("null page writer");
  absl::MutexLock lock(&mu_);
  if (!impl_->built) return absl::FailedPreconditionError("insert before build");
  if (impl_->position.size() + batch.keys.rows > (uint64_t{1} << 31)) {
    return absl::ResourceExhaustedError("index holds at most 2^31 tokens");
  }
  return impl_->InsertLocked(batch, writer);
}

absl::Status DciTree::Search(const float* queries, uint32_t group, uint32_t k,
                             std::vector<SelectedPage>* out) const {
  absl::Status valid = ValidateQueries(geometry_, queries, group);
  if (!valid.ok()) return valid;
  if (out == nullptr) return absl::InvalidArgumentError("null output");
  absl::ReaderMutexLock lock(&mu_);
  if (!impl_->built) return absl::FailedPreconditionError("search before build");
  if (k == 0 || k > impl_->live_pages) {
    return absl::InvalidArgumentError(
        absl::StrCat("k must be in 1..", impl_->live_pages, " (the pages of this index), got ", k));
  }
  impl_->SearchGroup(queries, group, k, out);
  return absl::OkStatus();
}

uint64_t DciTree::MaxBuildPages(uint64_t tokens) const {
  const uint64_t upper =
      static_cast<uint64_t>(std::floor(static_cast<double>(tokens) * impl_->o.promotion_ratio_1)) +
      1;
  return (tokens + geometry_.page_size - 1) / geometry_.page_size + upper + 32;
}

uint32_t DciTree::num_tokens() const {
  absl::ReaderMutexLock lock(&mu_);
  return static_cast<uint32_t>(impl_->position.size());
}

uint32_t DciTree::num_pages() const {
  absl::ReaderMutexLock lock(&mu_);
  return impl_->live_pages;
}

uint32_t DciTree::page_id_limit() const {
  absl::ReaderMutexLock lock(&mu_);
  return static_cast<uint32_t>(impl_->pages.size());
}

std::vector<PageInfo> DciTree::Layout() const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<PageInfo> out;
  out.reserve(impl_->live_pages);
  for (const Cell& c : impl_->cells) {
    for (size_t j = 0; j < c.page_ids.size(); ++j) {
      PageInfo info;
      info.page = c.page_ids[j];
      info.positions.resize(impl_->pages[info.page].valid);
      for (uint32_t i = c.PageStart(j); i < c.page_end[j]; ++i) {
        info.positions[impl_->slot_of[c.tok[i]]] = impl_->position[c.tok[i]];
      }
      out.push_back(std::move(info));
    }
  }
  std::sort(out.begin(), out.end(),
            [](const PageInfo& a, const PageInfo& b) { return a.page < b.page; });
  return out;
}

uint64_t DciTree::MemoryBytes() const {
  absl::ReaderMutexLock lock(&mu_);
  const Impl& m = *impl_;
  uint64_t bytes = m.position.capacity() * 4 + m.level.capacity() + m.page_of.capacity() * 4 +
                   m.slot_of.capacity() + m.sq.capacity() * 4 + m.u.capacity() * 4 +
                   m.pages.capacity() * sizeof(Impl::PageMeta) + m.free_pages.capacity() * 4 +
                   m.cells.capacity() * sizeof(Cell) +
                   m.child_cell.capacity() * (sizeof(uint32_t) * 2 + 1);
  for (const Cell& c : m.cells) bytes += c.Bytes();
  bytes += m.cell_ref.capacity() * sizeof(uint16_t) + m.cell_radius.capacity() * 4 +
           m.cell_ref_norm.capacity() * 4 + m.cell_centered.capacity() * 4;
  if (m.sketch) bytes += m.sketch->MemoryBytes();
  for (const auto& lt : m.level_tokens) bytes += lt.capacity() * 4;
  return bytes;
}

DciTree::Stats DciTree::GetStats() const {
  absl::ReaderMutexLock lock(&mu_);
  Stats s;
  s.levels = static_cast<uint32_t>(impl_->top + 1);
  s.tokens_per_level.assign(s.levels, 0);
  for (uint8_t l : impl_->level) ++s.tokens_per_level[l];
  s.cells = static_cast<uint32_t>(impl_->cells.size());
  s.pages = impl_->live_pages;
  s.tokens_scored_last_search = tls_last_scored;
  s.tokens_sketched_last_search = tls_last_sketched;
  s.cells_opened_last_search = tls_last_cells_opened;
  return s;
}

uint32_t DciTree::LevelOf(uint32_t t) const {
  absl::ReaderMutexLock lock(&mu_);
  return impl_->level.at(t);
}

uint32_t DciTree::ParentOf(uint32_t t) const {
  absl::ReaderMutexLock lock(&mu_);
  const uint32_t cell = impl_->pages.at(impl_->page_of.at(t)).cell;
  return impl_->cells[cell].owner == kNone ? kNoParent : impl_->cells[cell].owner;
}

std::pair<uint32_t, uint32_t> DciTree::LocationOf(uint32_t t) const {
  absl::ReaderMutexLock lock(&mu_);
  return {impl_->page_of.at(t), impl_->slot_of.at(t)};
}

absl::Status DciTree::CheckInvariants() const {
  absl::ReaderMutexLock lock(&mu_);
  const Impl& m = *impl_;
  const uint32_t n = static_cast<uint32_t>(m.position.size());
  std::vector<uint8_t> seen(n, 0);
  uint32_t live = 0;
  for (uint32_t cid = 0; cid < m.cells.size(); ++cid) {
    const Cell& c = m.cells[cid];
    if (c.proj.size() != c.tok.size()) return absl::InternalError("cell arrays differ in size");
    if (!std::is_sorted(c.proj.begin(), c.proj.end())) {
      return absl::InternalError(absl::StrCat("cell ", cid, " is not sorted by projection"));
    }
    if (c.page_ids.size() != c.page_end.size()) return absl::InternalError("page arrays differ");
    if (!c.tok.empty() && (c.page_end.empty() || c.page_end.back() != c.tok.size())) {
      return absl::InternalError(absl::StrCat("cell ", cid, " pages do not cover its tokens"));
    }
    const bool is_root = cid == m.root_cell;
    if (is_root != (c.owner == kNone)) return absl::InternalError("root cell ownership");
    if (!is_root && !c.tok.empty() && m.level[c.owner] != c.level + 1) {
      return absl::InternalError(absl::StrCat("cell ", cid, " owner is not one level up"));
    }
    if (is_root && c.level != m.top) return absl::InternalError("root cell not at top level");
    for (size_t j = 0; j < c.page_ids.size(); ++j) {
      const uint32_t p = c.page_ids[j];
      ++live;
      const uint32_t len = c.page_end[j] - c.PageStart(j);
      if (m.pages[p].cell != cid || m.pages[p].valid != len || len == 0 || len > m.g.page_size) {
        return absl::InternalError(absl::StrCat("page ", p, " of cell ", cid, " has ", len,
                                                " tokens, valid ", m.pages[p].valid));
      }
      std::vector<uint8_t> slots(m.g.page_size, 0);
      for (uint32_t i = c.PageStart(j); i < c.page_end[j]; ++i) {
        const uint32_t t = c.tok[i];
        if (seen[t]++) return absl::InternalError(absl::StrCat("token ", t, " in two slots"));
        if (m.page_of[t] != p || m.slot_of[t] >= len || slots[m.slot_of[t]]++) {
          return absl::InternalError(absl::StrCat("token ", t, " has a bad slot"));
        }
        if (m.level[t] != c.level) {
          return absl::InternalError(absl::StrCat("token ", t, " sits in a cell of another level"));
        }
      }
    }
  }
  for (uint32_t t = 0; t < n; ++t) {
    if (!seen[t]) return absl::InternalError(absl::StrCat("token ", t, " is in no page"));
  }
  if (live != m.live_pages) return absl::InternalError("live page count is off");
  if (m.sketching) {
    // Every member's packed code and factor are its residual's to the cell's reference, in
    // tok order (re-encoded here: inserts, removals and re-centring keep them in step), and
    // the padding of the last block is zero.
    const uint32_t cb = m.sketch->code_bytes(), bits = m.sketch->bits();
    std::vector<float> x(m.g.dim), scratch(bits);
    std::vector<uint8_t> want(cb), rows, padded;
    for (uint32_t cid = 0; cid < m.cells.size(); ++cid) {
      const Cell& c = m.cells[cid];
      const uint32_t cn = static_cast<uint32_t>(c.tok.size());
      if (c.code.size() != PackedSketchBytes(cn, bits) || c.fac.size() != cn) {
        return absl::InternalError(
            absl::StrCat("cell ", cid, " sketch arrays have the wrong size"));
      }
      if (cn == 0) continue;
      rows.resize(uint64_t{cn} * cb);
      UnpackSketchCodes(c.code.data(), cn, bits, rows.data());
      padded.resize(c.code.size());
      PackSketchCodes(rows.data(), cn, bits, padded.data());
      if (padded != c.code) {
        return absl::InternalError(absl::StrCat("cell ", cid, " sketch padding is not zero"));
      }
      const std::vector<float> ref = m.CellRef(cid);
      for (uint32_t i = 0; i < cn; ++i) {
        ToFloat(m.KeyPtr(c.tok[i]), m.g.elem_type, m.g.dim, x.data());
        for (uint32_t k = 0; k < m.g.dim; ++k) x[k] -= ref[k];
        const uint16_t fac = FloatToHalf(m.sketch->Encode(x.data(), want.data(), scratch.data()));
        if (fac != c.fac[i] ||
            !std::equal(want.begin(), want.end(), rows.begin() + uint64_t{i} * cb)) {
          return absl::InternalError(
              absl::StrCat("cell ", cid, " member ", i, " has a stale sketch"));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace icecache::index
