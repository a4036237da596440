#include "eval/layer_index.h"

#include <numeric>

#include "eval/in_memory_pages.h"
#include "eval/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache::eval {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

// A layer's heads built and searched on the pool select exactly what each head's own tree
// selects when used alone.
TEST(LayerIndex, ParallelHeadsMatchHeadsAlone) {
  SyntheticOptions so;
  so.num_tokens = 3000;
  so.num_kv_heads = 4;
  so.group_size = 2;
  so.num_queries = 3;
  const Trace t = GenerateSynthetic(so);
  const IndexGeometry g{64, t.kv_type, 16};
  std::vector<uint32_t> positions(3000);
  std::iota(positions.begin(), positions.end(), 0u);

  ThreadPool pool(2);
  std::vector<std::unique_ptr<InMemoryPages>> pages, alone_pages;
  std::vector<std::unique_ptr<InMemoryPages::Writer>> writers;
  std::vector<const PageReader*> readers;
  std::vector<PageWriter*> writer_ptrs;
  std::vector<KeyBatch> batches;
  for (uint32_t h = 0; h < 4; ++h) {
    pages.push_back(std::make_unique<InMemoryPages>(g, false));
    readers.push_back(pages.back().get());
    writers.push_back(
        std::make_unique<InMemoryPages::Writer>(pages.back().get(), t.Keys(0, h), nullptr));
    writer_ptrs.push_back(writers.back().get());
    batches.push_back({t.Keys(0, h), positions.data()});
  }
  LayerIndex layer(g, *selection::Preset(selection::kPaperPreset), 4, 2, readers, &pool);
  ASSERT_OK(layer.Build(batches, writer_ptrs));

  std::vector<float> q(8 * 64);
  for (uint32_t qh = 0; qh < 8; ++qh) std::copy_n(t.Query(0, qh, 1), 64, q.begin() + qh * 64);
  std::vector<std::vector<SelectedPage>> got;
  ASSERT_OK(layer.Search(q.data(), 12, &got));
  ASSERT_EQ(got.size(), 4u);
  for (uint32_t h = 0; h < 4; ++h) {
    InMemoryPages p(g, false);
    DciTree alone(g, DciOptions{}, &p);
    InMemoryPages::Writer w(&p, t.Keys(0, h), nullptr);
    ASSERT_OK(alone.Build({t.Keys(0, h), positions.data()}, &w));
    std::vector<SelectedPage> expect;
    ASSERT_OK(alone.Search(q.data() + h * 2 * 64, 2, 12, &expect));
    ASSERT_EQ(got[h].size(), expect.size());
    for (size_t i = 0; i < expect.size(); ++i) EXPECT_EQ(got[h][i].page, expect[i].page) << h;
  }
  // Errors name the head.
  EXPECT_THAT(layer.Search(q.data(), 100000, &got),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("KV head 0")));
  EXPECT_THAT(layer.Build({}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("one per KV head")));
}

}  // namespace
}  // namespace icecache::eval
