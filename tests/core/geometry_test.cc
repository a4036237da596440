#include "server/core/geometry.h"

#include <cmath>
#include <limits>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

// Llama-3.1-8B at 128k tokens.
GeometrySpec Llama8B() {
  GeometrySpec s;
  s.num_layers = 32;
  s.num_q_heads = 32;
  s.num_kv_heads = 8;
  s.head_dim = 128;
  s.dtype = DType::kBF16;
  s.max_tokens = 131072;
  return s;
}

void ExpectInvalid(const GeometrySpec& spec, const std::string& field_message) {
  EXPECT_THAT(ResolveGeometry(spec),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(field_message)));
}

TEST(ResolveGeometry, AppliesTheDefaults) {
  ASSERT_OK_AND_ASSIGN(Geometry g, ResolveGeometry(Llama8B()));
  EXPECT_EQ(g.page_size, 4u);
  EXPECT_EQ(g.budget_tokens, 256u);
  EXPECT_EQ(g.sink_tokens, 8u);
  EXPECT_EQ(g.window_tokens, 16u);
  EXPECT_EQ(g.full_kv_layers, 2u);
  EXPECT_EQ(g.selected_pages(), 58u);  // (256 - 8 - 16) / 4
  EXPECT_EQ(g.group_size(), 4u);
  EXPECT_EQ(g.offloaded_layers(), 30u);
}

TEST(ResolveGeometry, HostKvBytesCountsOffloadedLayersInWholePages) {
  ASSERT_OK_AND_ASSIGN(Geometry g, ResolveGeometry(Llama8B()));
  // 4 tokens x 128 dims x 2 bytes x (K+V) = 2 KiB per page; 32768 pages per head.
  EXPECT_EQ(g.page_bytes(), 2048u);
  EXPECT_EQ(g.pages_per_head(), 32768u);
  EXPECT_EQ(g.host_kv_bytes(), 30ull * 8 * 32768 * 2048);  // 15 GiB (30 of 32 layers)

  GeometrySpec s = Llama8B();
  s.max_tokens = 17;  // rounds up to 5 pages of 4
  s.full_kv_layers = 0;
  ASSERT_OK_AND_ASSIGN(Geometry small, ResolveGeometry(s));
  EXPECT_EQ(small.host_kv_bytes(), 32ull * 8 * 5 * 2048);
  s.page_size = 8;  // 3 pages of 8
  ASSERT_OK_AND_ASSIGN(Geometry eight, ResolveGeometry(s));
  EXPECT_EQ(eight.host_kv_bytes(), 32ull * 8 * 3 * 4096);
  s.page_size = 16;  // 2 pages of 16
  ASSERT_OK_AND_ASSIGN(Geometry sixteen, ResolveGeometry(s));
  EXPECT_EQ(sixteen.host_kv_bytes(), 32ull * 8 * 2 * 8192);
}

TEST(ResolveGeometry, UnsetSinkAndWindowAreTwoPagesOfTheChosenSize) {
  for (uint32_t page : {8u, 16u, 32u}) {
    GeometrySpec s = Llama8B();
    s.page_size = page;
    ASSERT_OK_AND_ASSIGN(Geometry g, ResolveGeometry(s));
    EXPECT_EQ(g.sink_tokens, 2 * page);
    EXPECT_EQ(g.window_tokens, 2 * page);
    EXPECT_EQ(g.selected_pages(), (256 - 4 * page) / page);  // 28, 12, 4
  }
  // Pages of 4: a sink of 2 pages, but the window never under 16 tokens (4 pages).
  GeometrySpec four = Llama8B();
  four.page_size = 4;
  ASSERT_OK_AND_ASSIGN(Geometry g4, ResolveGeometry(four));
  EXPECT_EQ(g4.sink_tokens, 8u);
  EXPECT_EQ(g4.window_tokens, 16u);
  EXPECT_EQ(g4.selected_pages(), 58u);
  GeometrySpec s = Llama8B();
  s.page_size = 16;
  s.sink_tokens = 0;  // an explicit value is kept
  ASSERT_OK_AND_ASSIGN(Geometry g, ResolveGeometry(s));
  EXPECT_EQ(g.sink_tokens, 0u);
  EXPECT_EQ(g.window_tokens, 32u);
}

TEST(ResolveGeometry, FullKvLayersDefaultIsClampedToTheLayerCount) {
  GeometrySpec s = Llama8B();
  s.num_layers = 1;
  ASSERT_OK_AND_ASSIGN(Geometry g, ResolveGeometry(s));
  EXPECT_EQ(g.full_kv_layers, 1u);
  EXPECT_EQ(g.host_kv_bytes(), 0u);
}

TEST(ResolveGeometry, ExplicitOptionalFieldsAreKept) {
  GeometrySpec s = Llama8B();
  s.page_size = 8;
  s.budget_tokens = 64;
  s.sink_tokens = 0;
  s.window_tokens = 16;
  s.full_kv_layers = 0;
  s.dtype = DType::kFP16;
  ASSERT_OK_AND_ASSIGN(Geometry g, ResolveGeometry(s));
  EXPECT_EQ(g.page_size, 8u);
  EXPECT_EQ(g.selected_pages(), 6u);
  EXPECT_EQ(g.dtype, DType::kFP16);
}

TEST(ResolveGeometry, EachRequiredFieldIsNamedWhenMissing) {
  GeometrySpec s = Llama8B();
  s.num_layers = 0;
  ExpectInvalid(s, "geometry.num_layers must be in 1..1024, got 0");
  s = Llama8B();
  s.num_kv_heads = 0;
  ExpectInvalid(s, "geometry.num_kv_heads must be in 1..1024, got 0");
  s = Llama8B();
  s.num_q_heads = 0;
  ExpectInvalid(s, "geometry.num_q_heads must be in 1..4096, got 0");
  s = Llama8B();
  s.head_dim = 0;
  ExpectInvalid(s, "geometry.head_dim must be 64, 128 or 256, got 0");
  s = Llama8B();
  s.dtype.reset();
  ExpectInvalid(s, "geometry.dtype must be DTYPE_BF16 or DTYPE_FP16");
  s = Llama8B();
  s.max_tokens = 0;
  ExpectInvalid(s, "geometry.max_tokens must be in 1..16777216, got 0");
}

TEST(ResolveGeometry, RejectsOutOfRangeValues) {
  GeometrySpec s = Llama8B();
  s.num_layers = 1025;
  ExpectInvalid(s, "geometry.num_layers");
  s = Llama8B();
  s.num_q_heads = 30;  // not a multiple of 8
  ExpectInvalid(s, "geometry.num_q_heads must be a multiple of num_kv_heads (8), got 30");
  s = Llama8B();
  s.num_kv_heads = 1;
  s.num_q_heads = 65;  // group of 65
  ExpectInvalid(s, "geometry.num_q_heads must be at most 64 x num_kv_heads (1)");
  s = Llama8B();
  s.head_dim = 96;
  ExpectInvalid(s, "geometry.head_dim must be 64, 128 or 256, got 96");
  s = Llama8B();
  s.max_tokens = (uint64_t{1} << 24) + 1;
  ExpectInvalid(s, "geometry.max_tokens");
  s = Llama8B();
  s.page_size = 12;
  ExpectInvalid(s, "geometry.page_size must be 4, 8, 16 or 32, got 12");
  s = Llama8B();
  s.page_size = 2;
  ExpectInvalid(s, "geometry.page_size must be 4, 8, 16 or 32, got 2");
  s = Llama8B();
  s.sink_tokens = 10;
  ExpectInvalid(s, "geometry.sink_tokens must be a multiple of page_size (4), got 10");
  s = Llama8B();
  s.window_tokens = 0;
  ExpectInvalid(s, "geometry.window_tokens must be a positive multiple of page_size (4)");
  s = Llama8B();
  s.budget_tokens = 250;
  ExpectInvalid(s, "geometry.budget_tokens must be a multiple of page_size (4)");
  s = Llama8B();
  s.budget_tokens = 24;  // 8 sink + 16 window leave no selected page
  ExpectInvalid(s,
                "geometry.budget_tokens must be at least sink_tokens + window_tokens + "
                "page_size (28)");
  s = Llama8B();
  s.page_size = 8;
  s.budget_tokens = 32;  // 16 sink + 16 window (2 pages of 8 each) leave no selected page
  ExpectInvalid(s,
                "geometry.budget_tokens must be at least sink_tokens + window_tokens + "
                "page_size (40)");
  s = Llama8B();
  s.page_size = 16;
  s.budget_tokens = 64;  // 32 sink + 32 window (2 pages of 16 each) leave no selected page
  ExpectInvalid(s,
                "geometry.budget_tokens must be at least sink_tokens + window_tokens + "
                "page_size (80)");
  s = Llama8B();
  s.budget_tokens = 65536 + 16;
  ExpectInvalid(s, "at most 65536");
  s = Llama8B();
  s.full_kv_layers = 33;
  ExpectInvalid(s, "geometry.full_kv_layers must be at most num_layers (32), got 33");
}

TEST(ResolveGeometry, HugeSinkAndWindowDoNotOverflow) {
  GeometrySpec s = Llama8B();
  s.sink_tokens = 0xFFFFFFF0u;
  s.window_tokens = 0xFFFFFFF0u;
  s.budget_tokens = 256;
  ExpectInvalid(s, "geometry.budget_tokens must be at least");
}

TEST(ResolveGeometry, LargestGeometryFitsIn64Bits) {
  GeometrySpec s;
  s.num_layers = GeometryLimits::kMaxNumLayers;
  s.num_kv_heads = GeometryLimits::kMaxNumKvHeads;
  s.num_q_heads = GeometryLimits::kMaxNumKvHeads * 4;
  s.head_dim = 256;
  s.dtype = DType::kBF16;
  s.max_tokens = GeometryLimits::kMaxTokens;
  s.page_size = 32;
  s.full_kv_layers = 0;
  ASSERT_OK_AND_ASSIGN(Geometry g, ResolveGeometry(s));
  EXPECT_EQ(g.host_kv_bytes(), 1024ull * 1024 * (1ull << 24) * 256 * 2 * 2);  // 2^56
}

TEST(ValidateLabel, PrintableAsciiUpTo128) {
  EXPECT_OK(ValidateLabel(""));
  EXPECT_OK(ValidateLabel("llama-8b/req-42"));
  EXPECT_THAT(ValidateLabel(std::string(129, 'a')),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("at most 128")));
  EXPECT_THAT(ValidateLabel("tab\there"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("printable ASCII")));
}

}  // namespace
}  // namespace icecache

namespace icecache {
namespace {

TEST(ResolveGeometry, TailEstimateDefaultsToMeanVarianceAtTheHeadDimsScale) {
  ASSERT_OK_AND_ASSIGN(Geometry g, ResolveGeometry(Llama8B()));
  EXPECT_EQ(g.tail, selection::TailMode::kMeanVariance);
  EXPECT_TRUE(g.keeps_summaries());
  EXPECT_FLOAT_EQ(g.softmax_scale, 1.0f / std::sqrt(128.0f));
  GeometrySpec s = Llama8B();
  s.tail = selection::TailMode::kNone;
  s.softmax_scale = 0.5f;
  ASSERT_OK_AND_ASSIGN(Geometry off, ResolveGeometry(s));
  EXPECT_EQ(off.tail, selection::TailMode::kNone);
  EXPECT_FALSE(off.keeps_summaries());
  EXPECT_EQ(off.softmax_scale, 0.5f);
}

TEST(ResolveGeometry, SoftmaxScaleMustBeFiniteAndPositive) {
  for (float bad : {0.0f, -1.0f, std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::quiet_NaN(), 2e6f}) {
    GeometrySpec s = Llama8B();
    s.softmax_scale = bad;
    ExpectInvalid(s, "geometry.softmax_scale must be finite, above 0 and at most 1e6");
  }
}

}  // namespace
}  // namespace icecache
