#include "server/core/promise.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "eval/in_memory_pages.h"
#include "eval/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "selection/index_factory.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

Geometry Shape(uint64_t max_tokens, uint32_t layers = 4, uint32_t full_kv = 1) {
  Geometry g;
  g.num_layers = layers;
  g.num_q_heads = 8;
  g.num_kv_heads = 2;
  g.head_dim = 64;
  g.dtype = DType::kFP16;
  g.max_tokens = max_tokens;
  g.page_size = 16;
  g.budget_tokens = 256;
  g.sink_tokens = 16;
  g.window_tokens = 64;
  g.full_kv_layers = full_kv;
  return g;
}

TEST(Promise, EverySequenceCostsSomethingEvenAllFullKv) {
  PromiseCalculator calc(*selection::Preset("paper"), 2);
  const SequencePromise p = calc.For(Shape(4096, 4, 4));
  EXPECT_EQ(p.pages, 0u);
  EXPECT_EQ(p.staging, 0u);
  EXPECT_EQ(p.heap, PromiseCalculator::kSequenceOverhead);
}

TEST(Promise, CoversPagesStagingAndHeap) {
  PromiseCalculator calc(*selection::Preset("paper"), 2);
  const Geometry g = Shape(4096);
  const SequencePromise p = calc.For(g);
  const uint64_t dense = uint64_t{3} * 2 * (4096 / 16) * g.page_bytes();
  EXPECT_GT(p.pages, dense);       // pages are clusters: not all full
  EXPECT_EQ(p.prefill_depth, 2u);  // 1 + 2 workers / 2 KV heads (at least 2, at most 3 layers)
  const uint64_t staged_token = 2 * 2 * 64 * 2;  // K and V, 2 KV heads, 64 dims, fp16
  // Two layers' prompts at max_tokens, and a window page (16 tokens, 4 KiB aligned) for each
  // of the 3 offloaded layers.
  EXPECT_EQ(p.staging, 2 * 4096 * staged_token + 3 * 8192);
  EXPECT_GT(p.heap, PromiseCalculator::kSequenceOverhead);
  EXPECT_EQ(p.total(), p.pages + p.staging + p.heap);
}

// The tail estimate's page summaries are charged to the heap at their stored size: three
// vectors of head_dim values in the K/V's 16-bit type per page the promise allows.
TEST(Promise, ChargesThePageSummariesAtTheirSixteenBitSize) {
  PromiseCalculator calc(*selection::Preset("paper"), 2);
  Geometry with = Shape(4096);
  with.tail = selection::TailMode::kMeanVariance;
  Geometry without = with;
  without.tail = selection::TailMode::kNone;
  const uint64_t heads = uint64_t{3} * 2;  // offloaded layers x KV heads
  EXPECT_EQ(calc.For(with).heap - calc.For(without).heap,
            heads * calc.PagesPerHead(with) * 3 * 64 * 2);
  EXPECT_EQ(calc.For(with).pages, calc.For(without).pages);
}

// The page bound holds for what the index really does: a prompt and appends up to max_tokens,
// in several splits, on clustered and on random keys, and the index's metadata stays within
// the heap part.
TEST(Promise, TheIndexStaysWithinThePromise) {
  const selection::IndexSpec spec = *selection::Preset("paper");
  PromiseCalculator calc(spec, 2);
  constexpr uint32_t kTokens = 6000;
  const Geometry g = Shape(kTokens);
  const uint64_t bound = calc.PagesPerHead(g);
  const uint64_t per_token = calc.MetadataBytesPerToken(g);
  for (const uint32_t clusters : {96u, 4000u}) {
    eval::SyntheticOptions so;
    so.num_tokens = kTokens;
    so.head_dim = 64;
    so.num_kv_heads = 1;
    so.num_clusters = clusters;
    so.kv_type = index::ElemType::kF16;
    const eval::Trace t = eval::GenerateSynthetic(so);
    const index::RowView keys = t.Keys(0, 0);
    for (const uint32_t prompt : {kTokens, kTokens / 2, 64u}) {
      const index::IndexGeometry ig{64, index::ElemType::kF16, 16};
      eval::InMemoryPages pages(ig, /*with_values=*/false);
      std::unique_ptr<index::KvIndex> idx = selection::CreateIndex(spec, ig, &pages);
      std::vector<uint32_t> positions(kTokens);
      std::iota(positions.begin(), positions.end(), 0u);
      auto batch = [&](uint32_t from, uint32_t n) {
        index::KeyBatch b;
        b.keys = index::RowView{keys.row(from), keys.type, keys.dim, n, keys.stride_bytes};
        b.positions = positions.data() + from;
        return b;
      };
      index::KeyBatch first = batch(0, prompt);
      eval::InMemoryPages::Writer w0(&pages, first.keys, nullptr);
      ASSERT_OK(idx->Build(first, &w0));
      uint64_t peak = idx->num_pages();
      for (uint32_t at = prompt; at < kTokens; at += 16) {
        const uint32_t n = std::min<uint32_t>(16, kTokens - at);
        index::KeyBatch b = batch(at, n);
        eval::InMemoryPages::Writer w(&pages, b.keys, nullptr);
        ASSERT_OK(idx->Insert(b, &w));
        peak = std::max<uint64_t>(peak, idx->num_pages() + idx->MaxInsertPages(16));
      }
      EXPECT_LE(peak, bound) << clusters << " clusters, prompt " << prompt;
      EXPECT_LE(idx->MemoryBytes(), per_token * kTokens + PromiseCalculator::kHeadOverhead)
          << clusters << " clusters, prompt " << prompt;
      std::printf(
          "clusters %u prompt %u: peak pages %llu (bound %llu, dense %u), metadata %llu B "
          "(bound %llu)\n",
          clusters, prompt, static_cast<unsigned long long>(peak),
          static_cast<unsigned long long>(bound), kTokens / 16,
          static_cast<unsigned long long>(idx->MemoryBytes()),
          static_cast<unsigned long long>(per_token * kTokens));
    }
  }
}

}  // namespace
}  // namespace icecache
