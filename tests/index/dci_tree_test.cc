#include "server/index/dci_tree.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "eval/in_memory_pages.h"
#include "eval/quality.h"
#include "eval/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/index/exact_oracle.h"
#include "server/index/simd.h"
#include "tests/support/status_matchers.h"

namespace icecache::index {

using namespace icecache::eval;
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

// Keys of one head from the synthetic generator, plus the positions 0..n-1.
struct HeadData {
  Trace trace;
  std::vector<uint32_t> positions;
  RowView Rows(uint32_t begin, uint32_t count) const {
    RowView v = trace.Keys(0, 0);
    v.data = v.row(begin);
    v.rows = count;
    return v;
  }
  RowView ValueRows(uint32_t begin, uint32_t count) const {
    RowView v = trace.Values(0, 0);
    v.data = v.row(begin);
    v.rows = count;
    return v;
  }
};

HeadData MakeHead(uint32_t tokens, uint32_t dim = 64, uint64_t seed = 7) {
  SyntheticOptions o;
  o.num_tokens = tokens;
  o.head_dim = dim;
  o.num_kv_heads = 1;
  o.group_size = 4;
  o.num_queries = 8;
  o.seed = seed;
  HeadData h;
  h.trace = GenerateSynthetic(o);
  h.positions.resize(tokens);
  std::iota(h.positions.begin(), h.positions.end(), 0u);
  return h;
}

// A writer that applies changes to the pages and remembers the last one.
class RecordingWriter final : public PageWriter {
 public:
  RecordingWriter(InMemoryPages* pages, RowView keys, const RowView* values)
      : inner_(pages, keys, values) {}
  void Apply(const LayoutChange& change) override {
    last = change;
    inner_.Apply(change);
  }
  LayoutChange last;

 private:
  InMemoryPages::Writer inner_;
};

// The lifted inner product T(a).T(b) with norm bound m.
double Lifted(const float* a, const float* b, uint32_t dim, double m) {
  double dot = 0, na = 0, nb = 0;
  for (uint32_t i = 0; i < dim; ++i) {
    dot += double(a[i]) * b[i];
    na += double(a[i]) * a[i];
    nb += double(b[i]) * b[i];
  }
  return dot + std::sqrt(std::max(m - na, 0.0) * std::max(m - nb, 0.0));
}

class DciTreeTest : public ::testing::Test {
 protected:
  void BuildOn(uint32_t build_tokens, const DciOptions& options = {}) {
    geometry_ = {data_.trace.head_dim, data_.trace.kv_type, 16};
    pages_ = std::make_unique<InMemoryPages>(geometry_, /*with_values=*/true);
    tree_ = std::make_unique<DciTree>(geometry_, options, pages_.get());
    RowView k = data_.Rows(0, build_tokens), v = data_.ValueRows(0, build_tokens);
    RecordingWriter w(pages_.get(), k, &v);
    ASSERT_OK(tree_->Build({k, data_.positions.data()}, &w));
    built_ = build_tokens;
  }
  LayoutChange InsertPage(uint32_t begin, uint32_t count = 16) {
    RowView k = data_.Rows(begin, count), v = data_.ValueRows(begin, count);
    RecordingWriter w(pages_.get(), k, &v);
    EXPECT_OK(tree_->Insert({k, data_.positions.data() + begin}, &w));
    return w.last;
  }
  // Every page holds exactly the keys and values of the positions the layout says.
  void ExpectPagesHoldTheirTokens(uint32_t tokens) {
    const uint64_t row = uint64_t{geometry_.dim} * ElemBytes(geometry_.elem_type);
    std::vector<int> seen(tokens, 0);
    for (const PageInfo& p : tree_->Layout()) {
      ASSERT_EQ(pages_->valid(p.page), p.positions.size()) << "page " << p.page;
      ASSERT_LE(p.positions.size(), 16u);
      for (size_t s = 0; s < p.positions.size(); ++s) {
        const uint32_t pos = p.positions[s];
        ASSERT_LT(pos, tokens);
        ++seen[pos];
        const uint8_t* k = static_cast<const uint8_t*>(pages_->PageKeys(p.page)) + s * row;
        const uint8_t* v = static_cast<const uint8_t*>(pages_->PageValues(p.page)) + s * row;
        ASSERT_EQ(std::memcmp(k, data_.Rows(pos, 1).data, row), 0) << "K of position " << pos;
        ASSERT_EQ(std::memcmp(v, data_.ValueRows(pos, 1).data, row), 0) << "V of position " << pos;
      }
    }
    for (uint32_t t = 0; t < tokens; ++t) ASSERT_EQ(seen[t], 1) << "position " << t;
    EXPECT_EQ(pages_->allocated_pages(), tree_->num_pages());
  }

  HeadData data_ = MakeHead(6000);
  IndexGeometry geometry_;
  std::unique_ptr<InMemoryPages> pages_;
  std::unique_ptr<DciTree> tree_;
  uint32_t built_ = 0;
};

TEST_F(DciTreeTest, PromotionIsDeterministicAndFollowsTheRatios) {
  data_ = MakeHead(10000);
  BuildOn(10000);
  const DciTree::Stats s = tree_->GetStats();
  // floor(10000 * 0.01) = 100 on level >= 1; 20 on >= 2; 4 on >= 3; none on 4.
  EXPECT_EQ(s.levels, 4u);
  EXPECT_THAT(s.tokens_per_level, ::testing::ElementsAre(9900, 80, 16, 4));
  // Every 100th token (1-based) is promoted: evenly spread in position.
  EXPECT_EQ(tree_->LevelOf(98), 0u);
  EXPECT_GE(tree_->LevelOf(99), 1u);
  EXPECT_GE(tree_->LevelOf(199), 1u);
  EXPECT_EQ(tree_->LevelOf(499), 2u);  // the 5th level-1 token moves up again
}

TEST_F(DciTreeTest, PromotionRatiosAreOptions) {
  DciOptions o;
  o.promotion_ratio_1 = 0.05;
  o.promotion_ratio_2 = 0.5;
  BuildOn(4000, o);
  const DciTree::Stats s = tree_->GetStats();
  ASSERT_GE(s.levels, 3u);
  EXPECT_EQ(s.tokens_per_level[0], 4000u - 200u);  // floor(4000 * 0.05) promoted
  EXPECT_EQ(s.tokens_per_level[1], 100u);          // half of them stay on level 1
}

TEST_F(DciTreeTest, ParentsAreTheExactNearestOnTheLevelAbove) {
  BuildOn(6000);
  ASSERT_OK(tree_->CheckInvariants());
  const uint32_t d = geometry_.dim;
  std::vector<std::vector<float>> keys(6000, std::vector<float>(d));
  double m = 0;
  for (uint32_t t = 0; t < 6000; ++t) {
    ToFloat(data_.Rows(t, 1).data, geometry_.elem_type, d, keys[t].data());
    double n = 0;
    for (float x : keys[t]) n += double(x) * x;
    m = std::max(m, n);
  }
  std::vector<std::vector<uint32_t>> by_level(8);
  for (uint32_t t = 0; t < 6000; ++t) by_level[tree_->LevelOf(t)].push_back(t);
  const uint32_t top = tree_->GetStats().levels - 1;
  uint32_t checked = 0;
  for (uint32_t t = 0; t < 6000; ++t) {
    const uint32_t l = tree_->LevelOf(t);
    if (l == top) {
      EXPECT_EQ(tree_->ParentOf(t), DciTree::kNoParent);
      continue;
    }
    uint32_t best = 0;
    double best_v = -1e300;
    for (uint32_t p : by_level[l + 1]) {
      const double v = Lifted(keys[t].data(), keys[p].data(), d, m);
      if (v > best_v) {
        best_v = v;
        best = p;
      }
    }
    const uint32_t got = tree_->ParentOf(t);
    ASSERT_EQ(tree_->LevelOf(got), l + 1);
    // Equal, or tied within float rounding of the fp32 sgemm.
    EXPECT_NEAR(Lifted(keys[t].data(), keys[got].data(), d, m), best_v, 1e-3 * std::fabs(best_v))
        << "token " << t << " parent " << got << " expected " << best;
    ++checked;
  }
  EXPECT_EQ(checked, 6000u - tree_->GetStats().tokens_per_level[top]);
}

TEST_F(DciTreeTest, DescentFindsMostParentsBeyondTheExactThreshold) {
  DciOptions o;
  o.exact_parent_max = 8;  // level 1 (60 tokens) is searched by descent
  BuildOn(6000, o);
  ASSERT_OK(tree_->CheckInvariants());
  DciTree reference(geometry_, DciOptions{}, pages_.get());
  InMemoryPages scratch(geometry_, false);
  RowView k = data_.Rows(0, 6000);
  InMemoryPages::Writer w(&scratch, k, nullptr);
  ASSERT_OK(reference.Build({k, data_.positions.data()}, &w));
  uint32_t same = 0, level0 = 0;
  for (uint32_t t = 0; t < 6000; ++t) {
    if (tree_->LevelOf(t) != 0) continue;
    ++level0;
    same += tree_->ParentOf(t) == reference.ParentOf(t);
  }
  EXPECT_GT(same, level0 * 9 / 10) << same << " of " << level0;
}

TEST_F(DciTreeTest, AnchorShortcutKeepsMostParentsExact) {
  DciOptions o;
  o.exact_parent_max = 100;  // level 0 (5940 tokens) exceeds it: anchors apply
  o.anchor_interval = 60;
  BuildOn(6000, o);
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(6000);
  InMemoryPages scratch(geometry_, false);
  DciTree reference(geometry_, DciOptions{}, &scratch);
  RowView k = data_.Rows(0, 6000);
  InMemoryPages::Writer w(&scratch, k, nullptr);
  ASSERT_OK(reference.Build({k, data_.positions.data()}, &w));
  uint32_t same = 0, level0 = 0;
  for (uint32_t t = 0; t < 6000; ++t) {
    if (tree_->LevelOf(t) != 0) continue;
    ++level0;
    same += tree_->ParentOf(t) == reference.ParentOf(t);
  }
  EXPECT_GT(same, level0 * 85 / 100) << same << " of " << level0;
}

TEST_F(DciTreeTest, BuildLaysEveryTokenIntoExactlyOneSlot) {
  BuildOn(6000);
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(6000);
  EXPECT_EQ(tree_->num_tokens(), 6000u);
  // Pages are partly filled (even split of each cell), never empty or over capacity.
  uint32_t tokens = 0;
  for (const PageInfo& p : tree_->Layout()) {
    EXPECT_GE(p.positions.size(), 1u);
    tokens += static_cast<uint32_t>(p.positions.size());
  }
  EXPECT_EQ(tokens, 6000u);
  EXPECT_GE(tree_->num_pages(), 6000u / 16);
}

TEST_F(DciTreeTest, ManyInsertsKeepTheLayoutConsistent) {
  BuildOn(3008);
  uint32_t changed_total = 0;
  for (uint32_t begin = 3008; begin < 6000; begin += 16) {
    const LayoutChange c = InsertPage(begin);
    EXPECT_FALSE(c.changed.empty());
    // Every new token is written once, from the batch.
    uint32_t from_batch = 0;
    for (const SlotWrite& w : c.writes) from_batch += w.src.kind == SlotSource::Kind::kBatch;
    EXPECT_EQ(from_batch, 16u);
    changed_total += static_cast<uint32_t>(c.changed.size());
  }
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(6000);
  const DciTree::Stats s = tree_->GetStats();
  EXPECT_EQ(std::accumulate(s.tokens_per_level.begin(), s.tokens_per_level.end(), 0u), 6000u);
  // Incremental promotion continued the counters: same level sizes as one build of 6000.
  EXPECT_EQ(s.tokens_per_level[0], 6000u - 60u);
  // An insert touches about one page per new token (they land in different clusters), plus
  // the second page of a split and, rarely, a re-projected cell's pages.
  EXPECT_LT(changed_total, 187u * 24u);
}

TEST_F(DciTreeTest, ANewTopLevelAdoptsTheOldRoot) {
  data_ = MakeHead(600);
  BuildOn(90);  // all on level 0: the root cell
  EXPECT_EQ(tree_->GetStats().levels, 1u);
  InsertPage(90, 16);  // token 99 (the 100th) starts level 1
  ASSERT_OK(tree_->CheckInvariants());
  EXPECT_EQ(tree_->GetStats().levels, 2u);
  EXPECT_EQ(tree_->LevelOf(99), 1u);
  EXPECT_EQ(tree_->ParentOf(0), 99u);
  EXPECT_EQ(tree_->ParentOf(99), DciTree::kNoParent);
  for (uint32_t b = 106; b + 16 <= 600; b += 16) InsertPage(b);
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(106 + (600 - 106) / 16 * 16);
}

TEST_F(DciTreeTest, GrowingNormBoundReprojectsTheCellAndReportsItsPages) {
  BuildOn(2000);
  // A key far longer than any before: it raises the bound of the cell it joins.
  std::vector<uint16_t> big(geometry_.dim * 16);
  for (uint32_t r = 0; r < 16; ++r) {
    for (uint32_t i = 0; i < geometry_.dim; ++i) {
      const float v = r == 0 ? 40.f * (i % 3 == 0 ? 1.f : -0.5f) : 0.01f * float(i);
      big[r * geometry_.dim + i] = FloatToHalf(v);
    }
  }
  RowView k{big.data(), ElemType::kF16, geometry_.dim, 16, 0};
  std::vector<uint32_t> pos(16);
  std::iota(pos.begin(), pos.end(), 100000u);
  RecordingWriter w(pages_.get(), k, &k);
  ASSERT_OK(tree_->Insert({k, pos.data()}, &w));
  ASSERT_OK(tree_->CheckInvariants());
  // The big token raised its cell's norm bound: the cell was re-projected, so every page of
  // the cell (the pages of all its siblings) is in the change.
  std::set<uint32_t> changed;
  for (const PageFill& f : w.last.changed) changed.insert(f.page);
  const uint32_t parent = tree_->ParentOf(2000), level = tree_->LevelOf(2000);
  std::set<uint32_t> cell_pages;
  for (uint32_t t = 0; t < tree_->num_tokens(); ++t) {
    if (tree_->LevelOf(t) == level && tree_->ParentOf(t) == parent) {
      cell_pages.insert(tree_->LocationOf(t).first);
    }
  }
  EXPECT_GE(cell_pages.size(), 2u);
  for (uint32_t p : cell_pages) EXPECT_TRUE(changed.count(p)) << "page " << p << " not reported";
}

TEST_F(DciTreeTest, SearchReturnsDistinctLivePagesWithTheirCounts) {
  BuildOn(6000);
  std::set<uint32_t> live;
  for (const PageInfo& p : tree_->Layout()) live.insert(p.page);
  for (uint32_t qi = 0; qi < 8; ++qi) {
    std::vector<float> q(4 * geometry_.dim);
    for (uint32_t h = 0; h < 4; ++h) {
      std::copy_n(data_.trace.Query(0, h, qi), geometry_.dim, q.begin() + h * geometry_.dim);
    }
    std::vector<SelectedPage> got;
    ASSERT_OK(tree_->Search(q.data(), 4, 12, &got));
    ASSERT_EQ(got.size(), 12u);
    std::set<uint32_t> distinct;
    for (const SelectedPage& p : got) {
      EXPECT_TRUE(live.count(p.page)) << p.page;
      EXPECT_EQ(p.valid, pages_->valid(p.page));
      distinct.insert(p.page);
    }
    EXPECT_EQ(distinct.size(), 12u);
  }
  // A single query's list is ranked best first.
  std::vector<SelectedPage> one;
  ASSERT_OK(tree_->Search(data_.trace.Query(0, 0, 0), 1, 12, &one));
  for (size_t i = 1; i < one.size(); ++i) EXPECT_GE(one[i - 1].score, one[i].score);
  // It scored far fewer keys than an exhaustive scan would.
  EXPECT_LT(tree_->GetStats().tokens_scored_last_search, 6000u);
}

TEST_F(DciTreeTest, TheBestPageContainsTheBestKeyOfAnEasyQuery) {
  BuildOn(6000);
  // A query equal to one key (scaled up): that key scores highest, its page must rank first.
  const uint32_t target = 4321;
  std::vector<float> q(geometry_.dim);
  ToFloat(data_.Rows(target, 1).data, geometry_.elem_type, geometry_.dim, q.data());
  for (float& x : q) x *= 10;
  std::vector<SelectedPage> got;
  ASSERT_OK(tree_->Search(q.data(), 1, 4, &got));
  EXPECT_EQ(got[0].page, tree_->LocationOf(target).first);
}

TEST(MergeRankInterleaved, InterleavesByRankDropsDuplicatesAndCuts) {
  auto P = [](uint32_t page) { return SelectedPage{page, 16, 0.f}; };
  std::vector<std::vector<SelectedPage>> lists = {
      {P(1), P(2), P(3)}, {P(2), P(4), P(5)}, {P(6), P(1), P(7)}};
  std::vector<uint32_t> order;
  for (const SelectedPage& p : MergeRankInterleaved(lists, 6)) order.push_back(p.page);
  // rank 0: 1, 2, 6; rank 1: (2 dup), 4, (1 dup); rank 2: 3, 5 -> cut at 6.
  EXPECT_THAT(order, ::testing::ElementsAre(1, 2, 6, 4, 3, 5));
  EXPECT_EQ(MergeRankInterleaved(lists, 2).size(), 2u);
  EXPECT_EQ(MergeRankInterleaved(lists, 100).size(), 7u);
}

TEST_F(DciTreeTest, BadInputGetsAClearErrorAndChangesNothing) {
  geometry_ = {64, ElemType::kF16, 16};
  pages_ = std::make_unique<InMemoryPages>(geometry_, false);
  tree_ = std::make_unique<DciTree>(geometry_, DciOptions{}, pages_.get());
  RowView k = data_.Rows(0, 500);
  InMemoryPages::Writer w(pages_.get(), k, nullptr);
  std::vector<float> q(64, 0.5f);
  std::vector<SelectedPage> out;

  EXPECT_THAT(tree_->Insert({k, data_.positions.data()}, &w),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("before build")));
  EXPECT_THAT(tree_->Search(q.data(), 1, 1, &out), StatusIs(absl::StatusCode::kFailedPrecondition));
  RowView empty = k;
  empty.rows = 0;
  EXPECT_THAT(tree_->Build({empty, data_.positions.data()}, &w),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty")));
  RowView wrong_dim = k;
  wrong_dim.dim = 32;
  EXPECT_THAT(tree_->Build({wrong_dim, data_.positions.data()}, &w),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dim 32")));
  RowView wrong_type = k;
  wrong_type.type = ElemType::kBF16;
  EXPECT_THAT(tree_->Build({wrong_type, data_.positions.data()}, &w),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bf16")));
  EXPECT_THAT(tree_->Build({k, nullptr}, &w),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("positions")));
  std::vector<uint16_t> nan_rows(2 * 64, FloatToHalf(1.f));
  nan_rows[64 + 5] = 0x7e00;  // NaN in row 1
  RowView nan_view{nan_rows.data(), ElemType::kF16, 64, 2, 0};
  EXPECT_THAT(tree_->Build({nan_view, data_.positions.data()}, &w),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("key row 1")));
  nan_rows[64 + 5] = 0x7c00;  // +inf
  EXPECT_THAT(tree_->Build({nan_view, data_.positions.data()}, &w),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not finite")));
  EXPECT_EQ(tree_->num_tokens(), 0u);
  EXPECT_EQ(pages_->allocated_pages(), 0u);

  ASSERT_OK(tree_->Build({k, data_.positions.data()}, &w));
  const uint32_t pages = tree_->num_pages();
  EXPECT_THAT(tree_->Build({k, data_.positions.data()}, &w),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("already built")));
  EXPECT_THAT(tree_->Search(q.data(), 1, 0, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("k must be in 1..")));
  EXPECT_THAT(tree_->Search(q.data(), 1, pages + 1, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("the pages of this index")));
  EXPECT_THAT(tree_->Search(q.data(), 0, 4, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("group size 0")));
  EXPECT_THAT(tree_->Search(nullptr, 1, 4, &out), StatusIs(absl::StatusCode::kInvalidArgument));
  q[7] = std::nanf("");
  EXPECT_THAT(tree_->Search(q.data(), 1, 4, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("query 0 is not finite")));
  EXPECT_THAT(tree_->Insert({nan_view, data_.positions.data()}, &w),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(tree_->num_tokens(), 500u);
  EXPECT_EQ(tree_->num_pages(), pages);
  ASSERT_OK(tree_->CheckInvariants());
}

TEST_F(DciTreeTest, SearchesRunSafelyWhileInsertsLand) {
  BuildOn(3008);
  std::atomic<bool> stop{false};
  std::atomic<int> searches{0}, failures{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 3; ++r) {
    readers.emplace_back([&, r] {
      std::vector<SelectedPage> got;
      while (!stop.load()) {
        const absl::Status s = tree_->Search(data_.trace.Query(0, r, r), 1, 12, &got);
        if (!s.ok() || got.size() != 12) failures.fetch_add(1);
        for (const SelectedPage& p : got) {
          if (p.valid == 0 || p.valid > 16) failures.fetch_add(1);
        }
        searches.fetch_add(1);
      }
    });
  }
  for (uint32_t begin = 3008; begin < 6000; begin += 16) InsertPage(begin);
  stop.store(true);
  for (auto& t : readers) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(searches.load(), 0);
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(6000);
}

// ---- The best-first search and the beam build.

DciOptions BestFirst(DciOptions::SearchMode mode, float slack = 1.0f, uint32_t rescore = 64) {
  DciOptions o;
  o.search_mode = mode;
  o.cell_bound_slack = slack;
  o.rescore_tokens = rescore;
  return o;
}

std::vector<uint32_t> PageIds(const std::vector<SelectedPage>& v) {
  std::vector<uint32_t> ids;
  for (const SelectedPage& p : v) ids.push_back(p.page);
  return ids;
}

// The group's queries of step qi.
std::vector<float> GroupQueries(const HeadData& h, uint32_t qi, uint32_t group, uint32_t dim) {
  std::vector<float> q(uint64_t{group} * dim);
  for (uint32_t g = 0; g < group; ++g) {
    std::copy_n(h.trace.Query(0, g, qi), dim, q.begin() + uint64_t{g} * dim);
  }
  return q;
}

// The tree's search returns the exact scan's pages of its own layout (best key per page), for
// the GQA group of 4 and k = 12, at each of the 8 query steps.
void ExpectSearchEqualsExactScan(const DciTree& tree, const InMemoryPages& pages,
                                 const HeadData& data, uint32_t dim, const std::string& context) {
  ExactOracle scan(&tree, &pages, ExactOracle::Rank::kBestToken);
  for (uint32_t qi = 0; qi < 8; ++qi) {
    const std::vector<float> q = GroupQueries(data, qi, 4, dim);
    std::vector<SelectedPage> got, want;
    ASSERT_OK(tree.Search(q.data(), 4, 12, &got));
    ASSERT_OK(scan.Search(q.data(), 4, 12, &want));
    EXPECT_EQ(PageIds(got), PageIds(want)) << context << "query " << qi;
  }
}

// With the valid bound (slack 1) the exact best-first search returns the exact scan's pages,
// in the same order, for groups of 1 and 4 and every k; and it reads fewer keys than the scan.
TEST_F(DciTreeTest, BestFirstExactReturnsTheExactScansPages) {
  BuildOn(6000, BestFirst(DciOptions::SearchMode::kBestFirstExact));
  ExactOracle scan(tree_.get(), pages_.get(), ExactOracle::Rank::kBestToken);
  uint64_t scored = 0;
  for (uint32_t qi = 0; qi < 8; ++qi) {
    for (uint32_t group : {1u, 4u}) {
      for (uint32_t k : {1u, 12u, 40u}) {
        const std::vector<float> q = GroupQueries(data_, qi, group, geometry_.dim);
        std::vector<SelectedPage> got, want;
        ASSERT_OK(tree_->Search(q.data(), group, k, &got));
        ASSERT_OK(scan.Search(q.data(), group, k, &want));
        EXPECT_EQ(PageIds(got), PageIds(want))
            << "query " << qi << " group " << group << " k " << k;
        if (group == 4 && k == 12) scored += tree_->GetStats().tokens_scored_last_search;
      }
    }
  }
  EXPECT_LT(scored, 8u * 6000u * 4u) << "the bound pruned nothing";
}

// Inserts (new cells, splits, re-projections, re-centring) keep every bound valid.
TEST_F(DciTreeTest, BestFirstExactStaysExactAcrossInserts) {
  BuildOn(3008, BestFirst(DciOptions::SearchMode::kBestFirstExact));
  for (uint32_t begin = 3008; begin < 6000; begin += 16) InsertPage(begin);
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(6000);
  ExpectSearchEqualsExactScan(*tree_, *pages_, data_, geometry_.dim, "");
}

// Re-ranking (DciOptions::rerank_extra_pages) keeps, of the exact best-first search's candidates
// (the exact scan's best 36 pages by best key), the 12 of the largest summed softmax-mass
// share, as a float64 reference computes it from every key of every candidate.
TEST_F(DciTreeTest, RerankKeepsThePagesOfTheLargestGroupMass) {
  DciOptions o = BestFirst(DciOptions::SearchMode::kBestFirstExact);
  o.rerank_extra_pages = 24;
  BuildOn(6000, o);
  ExactOracle scan(tree_.get(), pages_.get(), ExactOracle::Rank::kBestToken);
  std::vector<std::vector<uint32_t>> positions(tree_->page_id_limit());
  for (PageInfo& p : tree_->Layout()) positions[p.page] = std::move(p.positions);
  const uint32_t d = geometry_.dim;
  const double scale = 1.0 / std::sqrt(double(d));
  uint32_t differs_from_best_key = 0;
  for (uint32_t qi = 0; qi < 8; ++qi) {
    const std::vector<float> q = GroupQueries(data_, qi, 4, d);
    std::vector<SelectedPage> got, candidates, best_key;
    ASSERT_OK(tree_->Search(q.data(), 4, 12, &got));
    ASSERT_OK(scan.Search(q.data(), 4, 36, &candidates));
    ASSERT_OK(scan.Search(q.data(), 4, 12, &best_key));
    ASSERT_EQ(candidates.size(), 36u);
    std::vector<double> share(candidates.size(), 0.0);
    std::vector<float> key(d);
    for (uint32_t g = 0; g < 4; ++g) {
      std::vector<std::vector<double>> x(candidates.size());
      double best = -1e300;
      for (size_t i = 0; i < candidates.size(); ++i) {
        for (uint32_t pos : positions[candidates[i].page]) {
          ToFloat(data_.Rows(pos, 1).data, geometry_.elem_type, d, key.data());
          double dot = 0;
          for (uint32_t j = 0; j < d; ++j) dot += double(q[g * d + j]) * key[j];
          x[i].push_back(dot * scale);
          best = std::max(best, dot * scale);
        }
      }
      std::vector<double> mass(candidates.size(), 0.0);
      double total = 0;
      for (size_t i = 0; i < candidates.size(); ++i) {
        for (double v : x[i]) mass[i] += std::exp(v - best);
        total += mass[i];
      }
      for (size_t i = 0; i < candidates.size(); ++i) share[i] += mass[i] / total;
    }
    std::vector<size_t> order(candidates.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return share[a] > share[b] ||
             (share[a] == share[b] && candidates[a].page < candidates[b].page);
    });
    std::vector<uint32_t> want;
    for (size_t i = 0; i < 12; ++i) want.push_back(candidates[order[i]].page);
    EXPECT_EQ(PageIds(got), want) << "query " << qi;
    EXPECT_NEAR(got[0].score, share[order[0]], 1e-4) << "query " << qi;
    std::vector<uint32_t> a = PageIds(got), b = PageIds(best_key);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    differs_from_best_key += a != b;
  }
  EXPECT_GT(differs_from_best_key, 0u)
      << "re-ranking never changed the set: the test proves nothing";
}

// The sketch search with re-ranking (the fast preset's) returns k distinct live pages, at every
// k, also when k + the extra pages exceed the tree's pages.
TEST_F(DciTreeTest, RerankedSketchSearchReturnsKDistinctPages) {
  DciOptions sk = BestFirst(DciOptions::SearchMode::kBestFirstSketch, 0.4f, 64);
  sk.rerank_extra_pages = 24;
  sk.parent_beam = 8;
  BuildOn(6000, sk);
  const uint32_t pages = tree_->num_pages();
  for (uint32_t qi = 0; qi < 8; ++qi) {
    const std::vector<float> q = GroupQueries(data_, qi, 4, geometry_.dim);
    std::vector<SelectedPage> got;
    for (uint32_t k : {1u, 12u, pages - 10, pages}) {
      ASSERT_OK(tree_->Search(q.data(), 4, k, &got));
      ASSERT_EQ(got.size(), k) << "k " << k;
      const std::vector<uint32_t> ids = PageIds(got);
      EXPECT_EQ(std::set<uint32_t>(ids.begin(), ids.end()).size(), k) << "k " << k;
    }
    for (const SelectedPage& p : got) {
      EXPECT_GT(p.valid, 0u);
      EXPECT_LE(p.valid, 16u);
    }
  }
}

// The sketch search rescoring every key it estimates, with the valid bound, on a small tree:
// every cell is opened, every key rescored exactly, so it returns the exact scan's pages.
TEST_F(DciTreeTest, SketchSearchIsExactWhenEverythingIsRescored) {
  data_ = MakeHead(1500);
  BuildOn(1500, BestFirst(DciOptions::SearchMode::kBestFirstSketch, 1.0f, 100000));
  ExactOracle scan(tree_.get(), pages_.get(), ExactOracle::Rank::kBestToken);
  for (uint32_t qi = 0; qi < 8; ++qi) {
    const std::vector<float> q = GroupQueries(data_, qi, 4, geometry_.dim);
    std::vector<SelectedPage> got, want;
    ASSERT_OK(tree_->Search(q.data(), 4, 12, &got));
    ASSERT_OK(scan.Search(q.data(), 4, 12, &want));
    EXPECT_EQ(PageIds(got), PageIds(want)) << "query " << qi;
    EXPECT_EQ(tree_->GetStats().tokens_scored_last_search, 1500u * 4u);
  }
}

// The sketch search as configured for speed: the attention recall of its pages stays close to
// the exact scan's (over the indexed tokens), while it rescores a small share of the keys,
// and it always returns k distinct live pages.
TEST_F(DciTreeTest, SketchSearchRecallIsCloseToTheExactScans) {
  data_ = MakeHead(6000, 128);
  DciOptions o = BestFirst(DciOptions::SearchMode::kBestFirstSketch, 0.35f, 64);
  o.parent_beam = 8;
  BuildOn(6000, o);
  ExactOracle scan(tree_.get(), pages_.get(), ExactOracle::Rank::kBestToken);
  std::vector<std::vector<uint32_t>> positions(tree_->page_id_limit());
  for (PageInfo& p : tree_->Layout()) positions[p.page] = std::move(p.positions);
  double got_recall = 0, scan_recall = 0;
  uint64_t scored = 0;
  for (uint32_t qi = 0; qi < 8; ++qi) {
    const std::vector<float> q = GroupQueries(data_, qi, 4, 128);
    std::vector<SelectedPage> got, want;
    ASSERT_OK(tree_->Search(q.data(), 4, 12, &got));
    scored += tree_->GetStats().tokens_scored_last_search;
    ASSERT_OK(scan.Search(q.data(), 4, 12, &want));
    ASSERT_EQ(got.size(), 12u);
    const std::vector<uint32_t> ids = PageIds(got);
    const std::set<uint32_t> distinct(ids.begin(), ids.end());
    EXPECT_EQ(distinct.size(), 12u);
    for (uint32_t g = 0; g < 4; ++g) {
      FullAttention full;
      ComputeFullAttention(q.data() + g * 128, data_.Rows(0, 6000), nullptr, 6000, &full);
      for (const auto* sel : {&got, &want}) {
        std::vector<uint32_t> toks;
        for (const SelectedPage& p : *sel) {
          toks.insert(toks.end(), positions[p.page].begin(), positions[p.page].end());
        }
        (sel == &got ? got_recall : scan_recall) += AttentionRecall(full, toks) / 32;
      }
    }
  }
  EXPECT_GT(got_recall, scan_recall - 0.03) << got_recall << " vs the scan's " << scan_recall;
  EXPECT_LT(scored, 8u * 6000u * 4u / 5) << "rescored more than a fifth of the keys";
}

// Each query's candidates for the exact rescoring are cut to its best rescore_tokens
// estimates: with re-ranking off, the rescored keys are the union of the group's 4 sets, so
// at least R and at most 4 R, whichever order the cells were opened in (the valid bound, the
// default's slack, and R of 1, 7 and 64).
TEST_F(DciTreeTest, SketchSearchRescoresAtMostTheGroupsBestEstimates) {
  data_ = MakeHead(6000, 128);
  for (float slack : {1.0f, 0.4f}) {
    for (uint32_t r : {1u, 7u, 64u}) {
      DciOptions o = BestFirst(DciOptions::SearchMode::kBestFirstSketch, slack, r);
      o.parent_beam = 6;
      BuildOn(6000, o);
      for (uint32_t qi = 0; qi < 8; ++qi) {
        const std::vector<float> q = GroupQueries(data_, qi, 4, 128);
        std::vector<SelectedPage> got;
        ASSERT_OK(tree_->Search(q.data(), 4, 12, &got));
        const DciTree::Stats st = tree_->GetStats();
        // At least k keys per query (the pages it must nominate): 12 for R of 1 and 7.
        const uint64_t rr = std::max(r, 12u);
        EXPECT_GE(st.tokens_scored_last_search, rr * 4) << slack << " " << r;
        EXPECT_LE(st.tokens_scored_last_search, rr * 4 * 4) << slack << " " << r;
        EXPECT_GT(st.tokens_sketched_last_search, 0u);
        EXPECT_EQ(got.size(), 12u);
      }
    }
  }
}

// A search for more pages than rescore_tokens ranks every page it returns: a query's list
// holds only pages with one of its rescored keys, so it rescores at least k +
// rerank_extra_pages keys (with 4 per query, 40 pages would have been at most 16 ranked and 24
// filled unranked, score -inf).
TEST_F(DciTreeTest, ASearchForManyPagesRanksEveryPageItReturns) {
  data_ = MakeHead(6000, 128);
  for (uint32_t extra : {0u, 24u}) {
    DciOptions o = BestFirst(DciOptions::SearchMode::kBestFirstSketch, 0.4f, 4);
    o.parent_beam = 6;
    o.rerank_extra_pages = extra;
    BuildOn(6000, o);
    for (uint32_t qi = 0; qi < 4; ++qi) {
      const std::vector<float> q = GroupQueries(data_, qi, 4, 128);
      std::vector<SelectedPage> got;
      ASSERT_OK(tree_->Search(q.data(), 4, 40, &got));
      ASSERT_EQ(got.size(), 40u);
      const std::vector<uint32_t> ids = PageIds(got);
      EXPECT_EQ(std::set<uint32_t>(ids.begin(), ids.end()).size(), 40u);
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_TRUE(std::isfinite(got[i].score)) << "extra " << extra << ", page " << i;
        if (i > 0 && extra > 0) {
          EXPECT_GE(got[i - 1].score, got[i].score) << i;
        }
      }
      EXPECT_GE(tree_->GetStats().tokens_scored_last_search, uint64_t{40 + extra} * 4);
    }
  }
}

// A query of huge finite values overflows the kernels' dot products to +-inf (and the cell
// bounds to NaN where inf meets -inf): every search mode still answers k distinct live pages;
// and a tree whose keys are all equal (every estimate and score tied) as well.
TEST_F(DciTreeTest, SearchesSurviveOverflowingQueriesAndAllEqualKeys) {
  DciOptions fast = BestFirst(DciOptions::SearchMode::kBestFirstSketch, 0.4f, 64);
  fast.rerank_extra_pages = 24;
  fast.parent_beam = 6;
  fast.page_order = DciOptions::PageOrder::kClustered;
  const std::vector<DciOptions> modes = {
      DciOptions{}, BestFirst(DciOptions::SearchMode::kBestFirstExact),
      BestFirst(DciOptions::SearchMode::kBestFirstSketch, 0.4f, 64), fast};
  for (bool equal_keys : {false, true}) {
    data_ = MakeHead(3000, 64);
    if (equal_keys) {
      RowView all = data_.trace.Keys(0, 0);
      const uint64_t row = uint64_t{all.dim} * ElemBytes(all.type);
      uint8_t* base = const_cast<uint8_t*>(static_cast<const uint8_t*>(all.data));
      for (uint32_t t = 1; t < all.rows; ++t) std::copy_n(base, row, base + t * row);
    }
    for (size_t m = 0; m < modes.size(); ++m) {
      BuildOn(3000, modes[m]);
      std::vector<float> q(uint64_t{4} * 64);
      for (size_t i = 0; i < q.size(); ++i) q[i] = (i % 3 == 0 ? -3e38f : 3e38f);
      for (const std::vector<float>& query : {q, GroupQueries(data_, 0, 4, 64)}) {
        std::vector<SelectedPage> got;
        ASSERT_OK(tree_->Search(query.data(), 4, 12, &got)) << "mode " << m;
        ASSERT_EQ(got.size(), 12u) << "mode " << m << (equal_keys ? ", equal keys" : "");
        const std::vector<uint32_t> ids = PageIds(got);
        EXPECT_EQ(std::set<uint32_t>(ids.begin(), ids.end()).size(), 12u) << "mode " << m;
        for (const SelectedPage& p : got) {
          EXPECT_LT(p.page, tree_->page_id_limit());
          EXPECT_GT(p.valid, 0u);
        }
      }
    }
  }
}

// Searches with sketches run while inserts land (re-centred cells rewrite their sketches).
TEST_F(DciTreeTest, SketchSearchesRunSafelyWhileInsertsLand) {
  DciOptions o = BestFirst(DciOptions::SearchMode::kBestFirstSketch, 0.35f, 32);
  o.parent_beam = 8;
  BuildOn(3008, o);
  std::atomic<bool> stop{false};
  std::atomic<int> searches{0}, failures{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 2; ++r) {
    readers.emplace_back([&, r] {
      std::vector<SelectedPage> got;
      const std::vector<float> q = GroupQueries(data_, r, 4, geometry_.dim);
      while (!stop.load()) {
        const absl::Status s = tree_->Search(q.data(), 4, 12, &got);
        if (!s.ok() || got.size() != 12) failures.fetch_add(1);
        searches.fetch_add(1);
      }
    });
  }
  for (uint32_t begin = 3008; begin < 6000; begin += 16) InsertPage(begin);
  stop.store(true);
  for (auto& t : readers) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(searches.load(), 0);
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(6000);
}

// The beam build keeps every structural invariant of the paper's build, finds most of the
// exact nearest parents, and inserts after it keep them too.
TEST_F(DciTreeTest, BeamBuildKeepsTheInvariantsAndMostExactParents) {
  DciOptions beam;
  beam.parent_beam = 8;
  BuildOn(6000, beam);
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(6000);
  InMemoryPages scratch(geometry_, false);
  DciTree reference(geometry_, DciOptions{}, &scratch);
  RowView k = data_.Rows(0, 6000);
  InMemoryPages::Writer w(&scratch, k, nullptr);
  ASSERT_OK(reference.Build({k, data_.positions.data()}, &w));
  EXPECT_EQ(tree_->GetStats().tokens_per_level, reference.GetStats().tokens_per_level);
  uint32_t same = 0, level0 = 0;
  for (uint32_t t = 0; t < 6000; ++t) {
    if (tree_->LevelOf(t) != 0) continue;
    ++level0;
    same += tree_->ParentOf(t) == reference.ParentOf(t);
  }
  EXPECT_GT(same, level0 * 85 / 100) << same << " of " << level0;
  data_ = MakeHead(9000);
  BuildOn(3008, beam);
  for (uint32_t begin = 3008; begin + 16 <= 9000; begin += 16) InsertPage(begin);
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(3008 + (9000 - 3008) / 16 * 16);
}

// A descent can reach a level where no token it scored has children (nothing chose them as
// the nearest parent). The build's beam then takes the exact nearest token of the level above
// for that kid, and an insert's parent search scores every token of the level, instead of
// aborting the process on a check (as both did before). A beam of 1 on bench/index_speed's
// synthetic keys at 32k reaches such levels in the build (1,259 kids) and in the inserts
// (16 tokens of 4,096).
TEST_F(DciTreeTest, BeamBuildSurvivesLevelsWithoutChildren) {
  SyntheticOptions so;
  so.num_tokens = 32800 + 4096;
  so.head_dim = 128;
  so.num_kv_heads = 1;
  so.num_queries = 1;
  so.kv_type = ElemType::kBF16;
  so.num_clusters = 128;
  data_.trace = GenerateSynthetic(so);
  data_.positions.resize(so.num_tokens);
  std::iota(data_.positions.begin(), data_.positions.end(), 0u);
  DciOptions narrow;
  narrow.parent_beam = 1;
  BuildOn(32768, narrow);
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(32768);
  for (uint32_t begin = 32768; begin + 16 <= 32768 + 4096; begin += 16) InsertPage(begin);
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(32768 + 4096);
  // Every parent is on the level above its token (the fallback's among them).
  for (uint32_t t = 0; t < 32768 + 4096; ++t) {
    const uint32_t p = tree_->ParentOf(t);
    if (p == DciTree::kNoParent) continue;
    ASSERT_EQ(tree_->LevelOf(p), tree_->LevelOf(t) + 1) << "token " << t;
  }
}

// insert_beam widens only the inserts' parent search: the same build as without it, then
// parents that differ after the inserts, every invariant kept.
TEST_F(DciTreeTest, InsertBeamChangesOnlyTheInsertsParents) {
  data_ = MakeHead(12000);
  std::vector<std::vector<uint32_t>> built, after;
  for (uint32_t insert_beam : {0u, 8u}) {
    DciOptions o;
    o.parent_beam = 2;
    o.insert_beam = insert_beam;
    BuildOn(9008, o);
    built.emplace_back();
    for (uint32_t t = 0; t < 9008; ++t) built.back().push_back(tree_->ParentOf(t));
    for (uint32_t begin = 9008; begin + 16 <= 12000; begin += 16) InsertPage(begin);
    ASSERT_OK(tree_->CheckInvariants());
    ExpectPagesHoldTheirTokens(9008 + (12000 - 9008) / 16 * 16);
    after.emplace_back();
    for (uint32_t t = 0; t < tree_->num_tokens(); ++t) after.back().push_back(tree_->ParentOf(t));
  }
  EXPECT_EQ(built[0], built[1]);
  uint32_t differ = 0;
  for (uint32_t t = 0; t < after[0].size(); ++t) differ += after[0][t] != after[1][t];
  EXPECT_GT(differ, 0u);
}

// The options of the fast preset's search and build, with the given page order.
DciOptions FastLike(DciOptions::PageOrder order) {
  DciOptions o = BestFirst(DciOptions::SearchMode::kBestFirstSketch, 0.4f, 64);
  o.parent_beam = 6;
  o.insert_beam = 8;
  o.rerank_extra_pages = 24;
  o.page_order = order;
  return o;
}

// Mean squared distance of a page's keys to their page's mean (float64, from the data), over
// every token of the layout.
double MeanWithinPageSpread(const HeadData& h, const std::vector<PageInfo>& layout, uint32_t dim) {
  double total = 0;
  uint64_t tokens = 0;
  for (const PageInfo& p : layout) {
    std::vector<double> mean(dim, 0.0);
    std::vector<std::vector<float>> keys;
    for (uint32_t pos : p.positions) {
      keys.emplace_back(dim);
      ToFloat(h.Rows(pos, 1).data, h.Rows(pos, 1).type, dim, keys.back().data());
      for (uint32_t d = 0; d < dim; ++d) mean[d] += keys.back()[d];
    }
    for (double& m : mean) m /= static_cast<double>(keys.size());
    for (const std::vector<float>& k : keys) {
      for (uint32_t d = 0; d < dim; ++d) total += (k[d] - mean[d]) * (k[d] - mean[d]);
    }
    tokens += keys.size();
  }
  return total / static_cast<double>(tokens);
}

// kClustered changes which tokens share a page within each cell, nothing else: the same
// levels and parents as kProjection, every invariant and token in place after the build and
// after 374 inserted pages (nearest-member placement, splits), and pages whose keys sit much
// closer to their page's mean than the projection's slices of the same cells.
TEST_F(DciTreeTest, ClusteredPagesAreTighterAndKeepTheInvariantsThroughInserts) {
  BuildOn(6000, FastLike(DciOptions::PageOrder::kProjection));
  std::vector<uint32_t> parents(6000);
  for (uint32_t t = 0; t < 6000; ++t) parents[t] = tree_->ParentOf(t);
  const double slices = MeanWithinPageSpread(data_, tree_->Layout(), geometry_.dim);
  const uint32_t slice_pages = tree_->num_pages();
  BuildOn(6000, FastLike(DciOptions::PageOrder::kClustered));
  ASSERT_OK(tree_->CheckInvariants());
  ExpectPagesHoldTheirTokens(6000);
  for (uint32_t t = 0; t < 6000; ++t) ASSERT_EQ(tree_->ParentOf(t), parents[t]) << t;
  EXPECT_EQ(tree_->num_pages(), slice_pages);  // the same even fill of the same cells
  const double clustered = MeanWithinPageSpread(data_, tree_->Layout(), geometry_.dim);
  EXPECT_LT(clustered, 0.8 * slices) << "clustered " << clustered << ", slices " << slices;

  data_ = MakeHead(9000);
  BuildOn(3008, FastLike(DciOptions::PageOrder::kClustered));
  for (uint32_t begin = 3008; begin + 16 <= 9000; begin += 16) InsertPage(begin);
  ASSERT_OK(tree_->CheckInvariants());
  const uint32_t total = 3008 + (9000 - 3008) / 16 * 16;
  ExpectPagesHoldTheirTokens(total);
  EXPECT_EQ(tree_->num_tokens(), total);
}

// Degenerate keys (every key the same): one cell may hold nearly everything. Above 8,192
// members a cell keeps the projection order (bounded copies), below it the clustered split
// meets all-equal rows; either way the build and the inserts keep every invariant and token.
TEST_F(DciTreeTest, ClusteredPagesOnIdenticalKeysKeepTheInvariants) {
  for (uint32_t tokens : {3000u, 9600u}) {
    data_ = MakeHead(tokens + 320);
    const uint64_t row = uint64_t{data_.trace.head_dim} * ElemBytes(data_.trace.kv_type);
    uint8_t* keys = const_cast<uint8_t*>(static_cast<const uint8_t*>(data_.Rows(0, 1).data));
    for (uint32_t t = 1; t < tokens + 320; ++t) std::memcpy(keys + t * row, keys, row);
    BuildOn(tokens, FastLike(DciOptions::PageOrder::kClustered));
    ASSERT_OK(tree_->CheckInvariants());
    ExpectPagesHoldTheirTokens(tokens);
    // The largest cell: above the insert's 1,024 probes at 3,000 tokens, above the 8,192-member
    // clustering bound at 9,600.
    std::map<uint32_t, uint32_t> kids;
    for (uint32_t t = 0; t < tokens; ++t) {
      if (tree_->ParentOf(t) != DciTree::kNoParent) ++kids[tree_->ParentOf(t)];
    }
    uint32_t largest = 0;
    for (const auto& [parent, count] : kids) largest = std::max(largest, count);
    EXPECT_GT(largest, tokens == 3000u ? 1024u : 8192u);
    for (uint32_t begin = tokens; begin < tokens + 320; begin += 16) InsertPage(begin);
    ASSERT_OK(tree_->CheckInvariants());
    ExpectPagesHoldTheirTokens(tokens + 320);
  }
}

// Where the search or the build reads the projection order (the paper's descent, or no beam
// build), kClustered is not applied: the layout is kProjection's, page for page.
TEST_F(DciTreeTest, ClusteredOrderIsIgnoredWhereTheProjectionOrderIsRead) {
  for (DciOptions o : {DciOptions{}, BestFirst(DciOptions::SearchMode::kBestFirstSketch)}) {
    o.page_order = DciOptions::PageOrder::kProjection;
    BuildOn(3000, o);
    std::vector<PageInfo> want = tree_->Layout();
    o.page_order = DciOptions::PageOrder::kClustered;
    BuildOn(3000, o);
    std::vector<PageInfo> got = tree_->Layout();
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].page, want[i].page);
      EXPECT_EQ(got[i].positions, want[i].positions) << "page " << got[i].page;
    }
  }
}

// On a clustered layout the exact best-first search (valid bound) still returns the exact
// scan's pages of that layout, before and after inserts.
TEST_F(DciTreeTest, BestFirstExactReturnsTheExactScansPagesOnClusteredPages) {
  DciOptions o = BestFirst(DciOptions::SearchMode::kBestFirstExact);
  o.parent_beam = 8;
  o.page_order = DciOptions::PageOrder::kClustered;
  BuildOn(3008, o);
  for (int round = 0; round < 2; ++round) {
    ExpectSearchEqualsExactScan(*tree_, *pages_, data_, geometry_.dim,
                                "round " + std::to_string(round) + ", ");
    for (uint32_t begin = 3008; begin < 6000; begin += 16) InsertPage(begin);
    ASSERT_OK(tree_->CheckInvariants());
  }
}

// reproject_growth: a member whose norm exceeds its cell's bound by less than the factor is
// placed without re-projecting the cell. The tree keeps every invariant and every token, and
// the inserts rewrite fewer page slots than re-projecting at every new largest norm does.
TEST_F(DciTreeTest, ReprojectGrowthKeepsTheInvariantsAndRewritesLess) {
  uint64_t slots[2] = {0, 0};
  for (int relaxed = 0; relaxed < 2; ++relaxed) {
    data_ = MakeHead(9000);
    DciOptions o = BestFirst(DciOptions::SearchMode::kBestFirstSketch, 0.4f, 64);
    o.parent_beam = 8;
    o.reproject_growth = relaxed ? 1.25f : 1.0f;
    BuildOn(3008, o);
    for (uint32_t begin = 3008; begin + 16 <= 9000; begin += 16) {
      slots[relaxed] += InsertPage(begin).writes.size();
    }
    ASSERT_OK(tree_->CheckInvariants());
    ExpectPagesHoldTheirTokens(3008 + (9000 - 3008) / 16 * 16);
  }
  EXPECT_LT(slots[1], slots[0]) << "relaxed " << slots[1] << " paper " << slots[0];
}

TEST_F(DciTreeTest, SketchMetadataStaysUnderATenthOfTheKvBytes) {
  data_ = MakeHead(20000 + 64 * 16, 128);
  DciOptions o = BestFirst(DciOptions::SearchMode::kBestFirstSketch, 0.35f, 64);
  o.parent_beam = 8;
  BuildOn(20000, o);
  for (uint32_t p = 0; p < 64; ++p) InsertPage(20000 + p * 16);
  const double kv_bytes = (20000.0 + 64 * 16) * 128 * 2 /*K+V*/ * 2 /*fp16*/;
  EXPECT_LT(tree_->MemoryBytes() / kv_bytes, 0.10) << tree_->MemoryBytes();
}

TEST_F(DciTreeTest, MetadataStaysSmallAgainstTheKvBytes) {
  data_ = MakeHead(20000, 128);
  BuildOn(20000);
  const double kv_bytes = 20000.0 * 128 * 2 /*K+V*/ * 2 /*fp16*/;
  EXPECT_LT(tree_->MemoryBytes() / kv_bytes, 0.10) << tree_->MemoryBytes();
}

}  // namespace
}  // namespace icecache::index

namespace icecache::index {
namespace {

// The search scratch is per thread and shared by every tree the thread searches (the daemon's
// workers serve many sequences): a joint group search on a small tree after a single-query
// search on a big one must stay inside the scratch (found by AddressSanitizer on real-model
// data; without the fix this test overflows the heap).
TEST(DciTreeScratch, JointSearchOnASmallTreeAfterABigTreeOnTheSameThread) {
  const HeadData big = MakeHead(6000, 64, 11), small = MakeHead(600, 64, 12);
  const IndexGeometry geometry{64, big.trace.kv_type, 16};
  DciOptions joint;
  joint.joint_group_search = true;
  InMemoryPages big_pages(geometry, false), small_pages(geometry, false);
  DciTree big_tree(geometry, DciOptions{}, &big_pages);
  DciTree small_tree(geometry, joint, &small_pages);
  {
    InMemoryPages::Writer w(&big_pages, big.Rows(0, 6000), nullptr);
    ASSERT_OK(big_tree.Build({big.Rows(0, 6000), big.positions.data()}, &w));
  }
  {
    InMemoryPages::Writer w(&small_pages, small.Rows(0, 600), nullptr);
    ASSERT_OK(small_tree.Build({small.Rows(0, 600), small.positions.data()}, &w));
  }
  std::vector<float> q(4 * 64);
  for (uint32_t g = 0; g < 4; ++g) {
    std::copy(big.trace.Query(0, g, 0), big.trace.Query(0, g, 0) + 64, q.begin() + g * 64);
  }
  std::vector<SelectedPage> picked;
  ASSERT_OK(big_tree.Search(q.data(), 1, 12, &picked));  // grows the scratch's page stamps
  ASSERT_OK(small_tree.Search(q.data(), 4, 12, &picked));
  EXPECT_EQ(picked.size(), 12u);
  for (const SelectedPage& p : picked) EXPECT_LT(p.page, small_tree.page_id_limit());
}

}  // namespace
}  // namespace icecache::index
