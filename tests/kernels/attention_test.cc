// The CPU reference of the sparse paged decode attention against a naive float64 attention,
// over sweeps of head dims, dtypes, GQA groups and ragged chunk (page) fills; and the K/V copy
// references against direct indexing.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/half.h"
#include "common/thread_pool.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/kv_copy.h"
#include "kernels/page_layout.h"

namespace icecache {
namespace {

uint16_t Encode(float f, DType t) { return t == DType::kBF16 ? FloatToBf16(f) : FloatToHalf(f); }
float Decode(uint16_t v, DType t) { return t == DType::kBF16 ? Bf16ToFloat(v) : HalfToFloat(v); }

// A randomly built decode step: per KV head a sink chunk, a window chunk and pages (K then V
// rows in page_size-row frames) with random valid counts.
struct Case {
  DType dtype;
  uint32_t d, kv_heads, group, page_size;
  std::vector<uint16_t> q, out;
  std::vector<std::vector<uint16_t>> buffers;  // owned row storage
  std::vector<AttentionChunk> chunks;
  std::vector<uint32_t> offsets;
  DecodeAttentionParams params;
};

Case MakeCase(DType dtype, uint32_t d, uint32_t kv_heads, uint32_t group, uint32_t pages,
              uint32_t seed) {
  Case c{dtype, d, kv_heads, group, 16, {}, {}, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<uint32_t> fill(1, 16);
  const uint32_t qh = kv_heads * group;
  c.q.resize(uint64_t{qh} * d);
  for (auto& v : c.q) v = Encode(normal(rng) * 2.f, dtype);
  c.out.assign(uint64_t{qh} * d, 0xFFFF);  // poisoned
  auto rows = [&](uint32_t n) {
    std::vector<uint16_t> b(uint64_t{n} * d);
    for (auto& v : b) v = Encode(normal(rng), dtype);
    return b;
  };
  c.buffers.reserve(kv_heads * (4 + pages));
  c.offsets.push_back(0);
  for (uint32_t h = 0; h < kv_heads; ++h) {
    // Sink (16 rows) and window (7 rows): separate K and V buffers.
    for (uint32_t n : {16u, 7u}) {
      c.buffers.push_back(rows(n));
      c.buffers.push_back(rows(n));
      c.chunks.push_back({c.buffers[c.buffers.size() - 2].data(), c.buffers.back().data(), n, 0});
    }
    // Pages: one frame each, K rows then V rows, ragged valid counts.
    const PageLayout layout{16, d, 2};
    for (uint32_t p = 0; p < pages; ++p) {
      c.buffers.push_back(rows(32));
      const uint8_t* base = reinterpret_cast<const uint8_t*>(c.buffers.back().data());
      c.chunks.push_back({base, base + layout.half_bytes(), fill(rng), 0});
    }
    c.offsets.push_back(static_cast<uint32_t>(c.chunks.size()));
  }
  c.params.q = c.q.data();
  c.params.out = c.out.data();
  c.params.chunks = c.chunks.data();
  c.params.chunk_offsets = c.offsets.data();
  c.params.num_q_heads = qh;
  c.params.num_kv_heads = kv_heads;
  c.params.head_dim = d;
  c.params.dtype = dtype;
  c.params.scale = 1.0f / std::sqrt(static_cast<float>(d));
  return c;
}

// Naive attention in float64 over the decoded inputs.
std::vector<double> Naive(const Case& c) {
  const uint32_t d = c.d, qh_count = c.kv_heads * c.group;
  std::vector<double> out(uint64_t{qh_count} * d, 0.0);
  for (uint32_t qh = 0; qh < qh_count; ++qh) {
    const uint32_t h = qh / c.group;
    std::vector<double> logits;
    std::vector<const uint16_t*> vrows;
    for (uint32_t ci = c.offsets[h]; ci < c.offsets[h + 1]; ++ci) {
      const AttentionChunk& ch = c.chunks[ci];
      for (uint32_t r = 0; r < ch.count; ++r) {
        const uint16_t* k = static_cast<const uint16_t*>(ch.k) + uint64_t{r} * d;
        double s = 0;
        for (uint32_t i = 0; i < d; ++i) s += double(Decode(c.q[uint64_t{qh} * d + i], c.dtype)) * Decode(k[i], c.dtype);
        logits.push_back(s / std::sqrt(double(d)));
        vrows.push_back(static_cast<const uint16_t*>(ch.v) + uint64_t{r} * d);
      }
    }
    double mx = -1e300, z = 0;
    for (double l : logits) mx = std::max(mx, l);
    for (double l : logits) z += std::exp(l - mx);
    for (size_t j = 0; j < logits.size(); ++j) {
      const double w = std::exp(logits[j] - mx) / z;
      for (uint32_t i = 0; i < d; ++i) out[uint64_t{qh} * d + i] += w * Decode(vrows[j][i], c.dtype);
    }
  }
  return out;
}

class DecodeAttentionCpuTest
    : public ::testing::TestWithParam<std::tuple<DType, uint32_t, uint32_t>> {};

TEST_P(DecodeAttentionCpuTest, MatchesNaiveFloat64Attention) {
  const auto [dtype, d, group] = GetParam();
  ThreadPool pool(2);
  for (uint32_t pages : {0u, 1u, 5u, 23u}) {
    Case c = MakeCase(dtype, d, 3, group, pages, d * 7 + group * 13 + pages);
    ASSERT_TRUE(DecodeAttentionCpu(c.params, pages % 2 ? &pool : nullptr));
    const std::vector<double> expect = Naive(c);
    // Output is rounded to the dtype: bf16 keeps 8 bits of mantissa, fp16 11.
    const double tol = dtype == DType::kBF16 ? 1.6e-2 : 2.5e-3;
    for (size_t i = 0; i < expect.size(); ++i) {
      const float got = Decode(c.out[i], dtype);
      ASSERT_FALSE(std::isnan(got)) << i;
      ASSERT_NEAR(got, expect[i], tol * (1.0 + std::fabs(expect[i]))) << "element " << i
                                                                        << " pages " << pages;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Sweep, DecodeAttentionCpuTest,
    ::testing::Combine(::testing::Values(DType::kBF16, DType::kFP16),
                       ::testing::Values(64u, 128u, 256u), ::testing::Values(1u, 4u, 7u)),
    [](const auto& p) {
      return std::string(DTypeName(std::get<0>(p.param))) + "_d" +
             std::to_string(std::get<1>(p.param)) + "_g" + std::to_string(std::get<2>(p.param));
    });

TEST(DecodeAttentionCpu, EmptyHeadWritesZerosAndBadParamsWriteNothing) {
  Case c = MakeCase(DType::kFP16, 64, 2, 2, 0, 1);
  // KV head 1 has no rows at all.
  c.offsets[2] = c.offsets[1];
  ASSERT_TRUE(DecodeAttentionCpu(c.params));
  for (uint32_t i = 2 * 64; i < 4 * 64; ++i) EXPECT_EQ(Decode(c.out[i], DType::kFP16), 0.f);
  Case bad = MakeCase(DType::kFP16, 64, 2, 2, 1, 2);
  bad.params.head_dim = 96;
  EXPECT_FALSE(DecodeAttentionCpu(bad.params));
  EXPECT_STREQ(ValidateDecodeAttention(bad.params), "head_dim must be 64, 128 or 256");
  EXPECT_EQ(bad.out[0], 0xFFFF);  // untouched
  bad.params.head_dim = 64;
  bad.params.num_q_heads = 5;
  EXPECT_FALSE(DecodeAttentionCpu(bad.params));
  bad.params.num_q_heads = 4;
  bad.offsets[1] = 99;
  bad.offsets[2] = 3;
  EXPECT_FALSE(DecodeAttentionCpu(bad.params));
}

TEST(KvCopyCpu, AppendPlacesEachHeadsRowInItsSlot) {
  const uint32_t heads = 3, row = 256, slots = 5;
  std::vector<uint8_t> k_new(heads * row), v_new(heads * row), k(heads * slots * row, 0),
      v(heads * slots * row, 0);
  for (size_t i = 0; i < k_new.size(); ++i) {
    k_new[i] = static_cast<uint8_t>(i * 7 + 1);
    v_new[i] = static_cast<uint8_t>(i * 3 + 2);
  }
  AppendKvParams p{k_new.data(), v_new.data(), k.data(), v.data(), uint64_t{slots} * row, 2, heads, row};
  ASSERT_TRUE(AppendKvCpu(p));
  for (uint32_t h = 0; h < heads; ++h) {
    EXPECT_EQ(std::memcmp(k.data() + (h * slots + 2) * row, k_new.data() + h * row, row), 0);
    EXPECT_EQ(std::memcmp(v.data() + (h * slots + 2) * row, v_new.data() + h * row, row), 0);
    EXPECT_EQ(k[(h * slots + 1) * row], 0);  // other slots untouched
  }
  p.row_bytes = 100;
  EXPECT_FALSE(AppendKvCpu(p));
}

TEST(KvCopyCpu, StagingTransposesTokenMajorToHeadMajor) {
  const uint32_t tokens = 11, heads = 4, row = 128;
  std::vector<uint8_t> k(tokens * heads * row), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<uint8_t>(i);
    v[i] = static_cast<uint8_t>(i * 5);
  }
  const uint32_t begin = 3, count = 6;
  std::vector<uint8_t> kd(heads * count * row), vd(kd.size());
  ASSERT_TRUE(WriteStagingCpu({k.data(), v.data(), kd.data(), vd.data(), begin, count, heads, row}));
  for (uint32_t h = 0; h < heads; ++h) {
    for (uint32_t t = 0; t < count; ++t) {
      EXPECT_EQ(std::memcmp(kd.data() + (h * count + t) * row,
                            k.data() + ((begin + t) * heads + h) * row, row), 0);
      EXPECT_EQ(std::memcmp(vd.data() + (h * count + t) * row,
                            v.data() + ((begin + t) * heads + h) * row, row), 0);
    }
  }
}

}  // namespace
}  // namespace icecache
