// The CPU reference of the sparse paged decode attention against a naive float64 attention,
// over sweeps of head dims, dtypes, GQA groups and ragged chunk (page) fills; and the K/V copy
// references against direct indexing.
#include "kernels/attention.h"

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/half.h"
#include "common/thread_pool.h"
#include "gtest/gtest.h"
#include "kernels/kv_copy.h"
#include "kernels/page_layout.h"
#include "tests/kernels/attention_case.h"

namespace icecache {
namespace {

using testing::AddVirtualTail;
using testing::Case;
using testing::Decode;
using testing::MakeCase;
using testing::Naive;

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
      ASSERT_NEAR(got, expect[i], tol * (1.0 + std::fabs(expect[i])))
          << "element " << i << " pages " << pages;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, DecodeAttentionCpuTest,
                         ::testing::Combine(::testing::Values(DType::kBF16, DType::kFP16),
                                            ::testing::Values(64u, 128u, 256u),
                                            ::testing::Values(1u, 4u, 7u)),
                         [](const auto& p) {
                           return std::string(DTypeName(std::get<0>(p.param))) + "_d" +
                                  std::to_string(std::get<1>(p.param)) + "_g" +
                                  std::to_string(std::get<2>(p.param));
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

// Tail estimation: each query head's tail partial stands for virtual tokens of explicit
// logits and values; the output must be the float64 softmax over the real rows and those
// virtual tokens together. The virtual logits sit below, level with and above the real ones
// (shift), so the merge's rescaling goes both ways. Tolerance: the dtype's output rounding, as
// without a tail (the partials are fp32, their rounding is far below it).
class DecodeAttentionTailTest
    : public ::testing::TestWithParam<std::tuple<DType, uint32_t, uint32_t>> {};

TEST_P(DecodeAttentionTailTest, MatchesFloat64OverRealAndVirtualTokens) {
  const auto [dtype, d, group] = GetParam();
  ThreadPool pool(2);
  const double tol = dtype == DType::kBF16 ? 1.6e-2 : 2.5e-3;
  for (uint32_t pages : {0u, 5u}) {
    for (double shift : {-4.0, 0.0, 6.0}) {
      for (uint32_t virtual_tokens : {1u, 40u}) {
        Case c = MakeCase(dtype, d, 3, group, pages, d * 5 + group * 11 + pages);
        AddVirtualTail(c, virtual_tokens, d + pages + virtual_tokens, shift);
        ASSERT_TRUE(DecodeAttentionCpu(c.params, pages % 2 ? &pool : nullptr));
        const std::vector<double> expect = Naive(c);
        for (size_t i = 0; i < expect.size(); ++i) {
          const float got = Decode(c.out[i], dtype);
          ASSERT_FALSE(std::isnan(got)) << i;
          ASSERT_NEAR(got, expect[i], tol * (1.0 + std::fabs(expect[i])))
              << "element " << i << " pages " << pages << " shift " << shift << " virtual "
              << virtual_tokens;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, DecodeAttentionTailTest,
                         ::testing::Combine(::testing::Values(DType::kBF16, DType::kFP16),
                                            ::testing::Values(64u, 128u, 256u),
                                            ::testing::Values(1u, 4u)),
                         [](const auto& p) {
                           return std::string(DTypeName(std::get<0>(p.param))) + "_d" +
                                  std::to_string(std::get<1>(p.param)) + "_g" +
                                  std::to_string(std::get<2>(p.param));
                         });

// A partial whose sum is 0 changes nothing (its max and acc, garbage here, are not read): the
// output is bit for bit the output without a tail; the other heads do merge theirs.
TEST(DecodeAttentionCpu, EmptyTailPartialChangesNothing) {
  for (DType dtype : {DType::kBF16, DType::kFP16}) {
    Case plain = MakeCase(dtype, 128, 2, 4, 3, 77);
    ASSERT_TRUE(DecodeAttentionCpu(plain.params));
    Case tailed = MakeCase(dtype, 128, 2, 4, 3, 77);
    AddVirtualTail(tailed, 8, 5, /*shift=*/2.0, /*empty_every=*/2);  // heads 0, 2, 4, 6 empty
    ASSERT_TRUE(DecodeAttentionCpu(tailed.params));
    const std::vector<double> expect = Naive(tailed);
    bool some_merged = false;
    for (uint32_t qh = 0; qh < 8; ++qh) {
      for (uint32_t i = 0; i < 128; ++i) {
        const size_t at = size_t{qh} * 128 + i;
        if (qh % 2 == 0) {
          ASSERT_EQ(tailed.out[at], plain.out[at]) << "head " << qh << " dim " << i;
        } else {
          some_merged |= tailed.out[at] != plain.out[at];
          ASSERT_NEAR(Decode(tailed.out[at], dtype), expect[at],
                      1.6e-2 * (1 + std::fabs(expect[at])));
        }
      }
    }
    EXPECT_TRUE(some_merged);
  }
}

// A KV head with no rows outputs its tail's own acc / sum; with an empty tail, zeros.
TEST(DecodeAttentionCpu, NoRowsWithATailOutputsTheTail) {
  Case c = MakeCase(DType::kFP16, 64, 2, 2, 0, 9);
  c.offsets[2] = c.offsets[1];                      // KV head 1 (query heads 2, 3) has no rows
  AddVirtualTail(c, 6, 3, 0.0, /*empty_every=*/3);  // query heads 0 and 3 empty
  ASSERT_TRUE(DecodeAttentionCpu(c.params));
  const float* t2 = c.tail.data() + 2 * 66;
  for (uint32_t i = 0; i < 64; ++i) {
    const float want = t2[2 + i] / t2[1];
    EXPECT_NEAR(Decode(c.out[2 * 64 + i], DType::kFP16), want, 2.5e-3 * (1 + std::fabs(want)));
    EXPECT_EQ(Decode(c.out[3 * 64 + i], DType::kFP16), 0.f);  // no rows, empty tail
  }
  const std::vector<double> expect = Naive(c);
  for (size_t i = 0; i < 4 * 64; ++i) {
    EXPECT_NEAR(Decode(c.out[i], DType::kFP16), expect[i], 2.5e-3 * (1 + std::fabs(expect[i])))
        << i;
  }
}

TEST(KvCopyCpu, AppendPlacesEachHeadsRowInItsSlot) {
  const uint32_t heads = 3, row = 256, slots = 5;
  std::vector<uint8_t> k_new(heads * row), v_new(heads * row), k(heads * slots * row, 0),
      v(heads * slots * row, 0);
  for (size_t i = 0; i < k_new.size(); ++i) {
    k_new[i] = static_cast<uint8_t>(i * 7 + 1);
    v_new[i] = static_cast<uint8_t>(i * 3 + 2);
  }
  AppendKvParams p{k_new.data(), v_new.data(), k.data(), v.data(), uint64_t{slots} * row, 2,
                   heads,        row};
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
  ASSERT_TRUE(
      WriteStagingCpu({k.data(), v.data(), kd.data(), vd.data(), begin, count, heads, row}));
  for (uint32_t h = 0; h < heads; ++h) {
    for (uint32_t t = 0; t < count; ++t) {
      EXPECT_EQ(std::memcmp(kd.data() + (h * count + t) * row,
                            k.data() + ((begin + t) * heads + h) * row, row),
                0);
      EXPECT_EQ(std::memcmp(vd.data() + (h * count + t) * row,
                            v.data() + ((begin + t) * heads + h) * row, row),
                0);
    }
  }
}

}  // namespace
}  // namespace icecache
