#include "selection/index_factory.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "eval/in_memory_pages.h"
#include "eval/synthetic.h"
#include "server/index/exact_oracle.h"
#include "tests/support/status_matchers.h"

namespace icecache::selection {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(IndexFactory, PresetNames) {
  EXPECT_THAT(PresetNames(), ElementsAre("paper", "tuned", "fast"));
  EXPECT_EQ(PresetList(), "paper, tuned, fast");
  EXPECT_THAT(Preset("quick").status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "unknown index preset 'quick' (known: paper, tuned, fast)"));
  EXPECT_THAT(Preset("").status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(IndexFactory, ParsePageOrder) {
  EXPECT_EQ(*ParsePageOrder("projection"), index::DciOptions::PageOrder::kProjection);
  EXPECT_EQ(*ParsePageOrder("clustered"), index::DciOptions::PageOrder::kClustered);
  EXPECT_THAT(ParsePageOrder("spiral").status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "unknown page order 'spiral' (known: projection, clustered)"));
  EXPECT_THAT(ParsePageOrder("").status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParsePageOrder("Clustered").status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(IndexFactory, PaperIsTheDciDefaults) {
  absl::StatusOr<IndexSpec> paper = Preset("paper");
  ASSERT_TRUE(paper.ok());
  EXPECT_EQ(paper->name, "paper");
  const index::DciOptions d;
  EXPECT_EQ(paper->dci.promotion_ratio_1, d.promotion_ratio_1);
  EXPECT_EQ(paper->dci.fov_ratio, d.fov_ratio);
  EXPECT_FALSE(paper->dci.joint_group_search);
  EXPECT_EQ(paper->dci.exact_search_max_tokens, 0u);
  absl::StatusOr<IndexSpec> tuned = Preset("tuned");
  ASSERT_TRUE(tuned.ok());
  EXPECT_TRUE(tuned->dci.joint_group_search);
  EXPECT_TRUE(tuned->dci.page_granular_scoring);
  EXPECT_TRUE(tuned->dci.scale_query_projection);
  EXPECT_EQ(tuned->dci.page_score, index::DciOptions::PageScore::kSoftmaxMass);
  EXPECT_EQ(tuned->dci.group_merge, index::DciOptions::GroupMerge::kSumOfMass);
  EXPECT_EQ(tuned->dci.exact_search_max_tokens, 4096u);
  // The paper preset keeps the paper's descent and build.
  EXPECT_EQ(paper->dci.search_mode, index::DciOptions::SearchMode::kBeamDescent);
  EXPECT_EQ(paper->dci.parent_beam, 0u);
  EXPECT_EQ(paper->dci.exact_parent_max, 3000u);
  absl::StatusOr<IndexSpec> fast = Preset("fast");
  ASSERT_TRUE(fast.ok());
  EXPECT_EQ(fast->dci.search_mode, index::DciOptions::SearchMode::kBestFirstSketch);
  // The build's beam of 6 (docs/index.md "A build beam of 6"), the inserts' of 8.
  EXPECT_EQ(fast->dci.parent_beam, 6u);
  EXPECT_EQ(fast->dci.insert_beam, 8u);
  EXPECT_EQ(fast->dci.promotion_ratio_1, d.promotion_ratio_1);
  // The fast preset re-ranks its best k + 24 pages by the group's mass; the paper's does not.
  EXPECT_EQ(fast->dci.rerank_extra_pages, 24u);
  EXPECT_EQ(paper->dci.rerank_extra_pages, 0u);
  // Each query rescores its 128 best estimates exactly: enough candidates for the default
  // pages of 4, which ask for 58 + 24 pages at 256 (docs/model.md "Pages of 4: the default").
  EXPECT_EQ(fast->dci.rescore_tokens, 128u);
}

// The daemon's default is the fast preset (docs/index.md: it wins on speed and quality).
TEST(IndexFactory, TheDefaultIsTheFastPreset) {
  EXPECT_EQ(kDefaultPreset, kFastPreset);
  EXPECT_TRUE(Preset(kDefaultPreset).ok());
}

// The factory's tuned index scans small trees exactly and ranks by mass: on 1,500 tokens its
// pages are the exact oracle's best-mass pages of its own layout.
TEST(IndexFactory, TunedIndexIsExactOnSmallTrees) {
  eval::SyntheticOptions o;
  o.num_tokens = 1500;
  o.head_dim = 64;
  o.num_kv_heads = 1;
  o.group_size = 4;
  o.num_queries = 3;
  const eval::Trace t = eval::GenerateSynthetic(o);
  const index::IndexGeometry g{64, t.kv_type, 16};
  eval::InMemoryPages pages(g, /*with_values=*/false);
  std::unique_ptr<index::KvIndex> ix = CreateIndex(*Preset("tuned"), g, &pages);
  EXPECT_STREQ(ix->name(), "icecache-dci");
  std::vector<uint32_t> positions(o.num_tokens);
  for (uint32_t i = 0; i < o.num_tokens; ++i) positions[i] = i;
  eval::InMemoryPages::Writer writer(&pages, t.Keys(0, 0), nullptr);
  ASSERT_TRUE(ix->Build(index::KeyBatch{t.Keys(0, 0), positions.data()}, &writer).ok());
  index::ExactOracle oracle(ix.get(), &pages, index::ExactOracle::Rank::kSoftmaxMass);
  for (uint32_t qi = 0; qi < 3; ++qi) {
    std::vector<float> q(4 * 64);
    for (uint32_t h = 0; h < 4; ++h) {
      std::copy_n(t.Query(0, h, qi), 64, q.begin() + h * 64);
    }
    std::vector<index::SelectedPage> got, want;
    ASSERT_TRUE(ix->Search(q.data(), 4, 12, &got).ok());
    ASSERT_TRUE(oracle.Search(q.data(), 4, 12, &want).ok());
    ASSERT_EQ(got.size(), 12u);
    std::vector<uint32_t> a, b;
    for (const auto& p : got) a.push_back(p.page);
    for (const auto& p : want) b.push_back(p.page);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    EXPECT_EQ(a, b) << "query " << qi;
  }
}

}  // namespace
}  // namespace icecache::selection
