// Dequantization against hand-computed blocks of every type, the reference quantizers on
// blocks whose quantization is exact, Quantize -> Dequantize round trips within each type's
// error bound, argument checks, and a throughput smoke check.
#include "model/io/quant.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache::model {
namespace {

using ::icecache::testing::StatusIs;

void PutU16(std::vector<uint8_t>* b, uint16_t v) {
  b->push_back(static_cast<uint8_t>(v & 0xff));
  b->push_back(static_cast<uint8_t>(v >> 8));
}
void PutU32(std::vector<uint8_t>* b, uint32_t v) {
  for (int i = 0; i < 4; ++i) b->push_back(static_cast<uint8_t>(v >> (8 * i)));
}

// f16 bit patterns used below.
constexpr uint16_t kHalfOne = 0x3c00;       // 1.0
constexpr uint16_t kHalfTwo = 0x4000;       // 2.0
constexpr uint16_t kHalfHalf = 0x3800;      // 0.5
constexpr uint16_t kHalfQuarter = 0x3400;   // 0.25
constexpr uint16_t kHalfEighth = 0x3000;    // 0.125
constexpr uint16_t kHalfMinusOne = 0xbc00;  // -1.0

std::vector<float> Dequant(GgmlType type, const std::vector<uint8_t>& data) {
  const uint64_t n = data.size() / GgmlBlockBytes(type) * GgmlBlockElements(type);
  std::vector<float> out(n, std::numeric_limits<float>::quiet_NaN());
  EXPECT_OK(Dequantize(type, data.data(), n, out.data()));
  return out;
}

TEST(HalfTest, FastConversionMatchesReferenceOnAllBitPatterns) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float ref = HalfToFloat(static_cast<uint16_t>(h));
    const float got = HalfToFloatFast(static_cast<uint16_t>(h));
    uint32_t a, b;
    std::memcpy(&a, &ref, 4);
    std::memcpy(&b, &got, 4);
    ASSERT_EQ(a, b) << std::hex << "half 0x" << h;
  }
}

TEST(DequantizeTest, F32AndF16) {
  const float f[3] = {1.5f, -0.0f, 3e38f};
  std::vector<uint8_t> bytes(sizeof(f));
  std::memcpy(bytes.data(), f, sizeof(f));
  EXPECT_THAT(Dequant(GgmlType::kF32, bytes), ::testing::ElementsAre(1.5f, -0.0f, 3e38f));

  std::vector<uint8_t> h;
  for (uint16_t v : {kHalfOne, uint16_t{0xc000}, uint16_t{0x7bff}, uint16_t{0x0001},
                     uint16_t{0x7c00}, uint16_t{0x8000}, uint16_t{0x3555}}) {
    PutU16(&h, v);
  }
  const std::vector<float> y = Dequant(GgmlType::kF16, h);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], -2.0f);
  EXPECT_EQ(y[2], 65504.0f);
  EXPECT_EQ(y[3], std::ldexp(1.0f, -24));
  EXPECT_EQ(y[4], std::numeric_limits<float>::infinity());
  EXPECT_EQ(y[5], 0.0f);
  EXPECT_TRUE(std::signbit(y[5]));
  EXPECT_EQ(y[6], 0.333251953125f);
}

// Q4_0 {d; qs[16]}, x = (q - 8) * d, low nibbles = elements 0..15, high = 16..31.
TEST(DequantizeTest, Q4_0KnownBlock) {
  std::vector<uint8_t> b;
  PutU16(&b, kHalfHalf);
  for (int j = 0; j < 16; ++j) b.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  const std::vector<float> y = Dequant(GgmlType::kQ4_0, b);
  ASSERT_EQ(y.size(), 32u);
  EXPECT_EQ(y[0], -4.0f);   // (0 - 8) * 0.5
  EXPECT_EQ(y[8], 0.0f);    // (8 - 8) * 0.5
  EXPECT_EQ(y[15], 3.5f);   // (15 - 8) * 0.5
  EXPECT_EQ(y[16], 3.5f);   // high nibble of qs[0] = 15
  EXPECT_EQ(y[31], -4.0f);  // high nibble of qs[15] = 0
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], (j - 8) * 0.5f) << j;
    EXPECT_EQ(y[j + 16], (7 - j) * 0.5f) << j;
  }
}

// Q4_1 {d; m; qs[16]}, x = q * d + m.
TEST(DequantizeTest, Q4_1KnownBlock) {
  std::vector<uint8_t> b;
  PutU16(&b, kHalfQuarter);
  PutU16(&b, kHalfMinusOne);
  for (int j = 0; j < 16; ++j) b.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  const std::vector<float> y = Dequant(GgmlType::kQ4_1, b);
  EXPECT_EQ(y[0], -1.0f);   // 0 * 0.25 - 1
  EXPECT_EQ(y[15], 2.75f);  // 15 * 0.25 - 1
  EXPECT_EQ(y[16], 2.75f);  // 15 * 0.25 - 1
  EXPECT_EQ(y[31], -1.0f);  // 0 * 0.25 - 1
  EXPECT_EQ(y[4], 0.0f);    // 4 * 0.25 - 1
  EXPECT_EQ(y[20], 1.75f);  // 11 * 0.25 - 1
}

// Q5_0 {d; qh[4]; qs[16]}, x = ((nibble | bit << 4) - 16) * d, bit j of qh for element j.
TEST(DequantizeTest, Q5_0KnownBlocks) {
  std::vector<uint8_t> b;
  // Block 0: fifth bit set for elements 0..15 only.
  PutU16(&b, kHalfOne);
  PutU32(&b, 0x0000ffffu);
  for (int j = 0; j < 16; ++j) b.push_back(static_cast<uint8_t>(j | (j << 4)));
  // Block 1: fifth bit for elements 0 and 31 only, every nibble 0xf, d = 2.
  PutU16(&b, kHalfTwo);
  PutU32(&b, 0x80000001u);
  for (int j = 0; j < 16; ++j) b.push_back(0xff);
  const std::vector<float> y = Dequant(GgmlType::kQ5_0, b);
  ASSERT_EQ(y.size(), 64u);
  EXPECT_EQ(y[0], 0.0f);     // (0 | 16) - 16
  EXPECT_EQ(y[15], 15.0f);   // (15 | 16) - 16
  EXPECT_EQ(y[16], -16.0f);  // 0 - 16
  EXPECT_EQ(y[31], -1.0f);   // 15 - 16
  EXPECT_EQ(y[32], 30.0f);   // ((15 | 16) - 16) * 2
  EXPECT_EQ(y[33], -2.0f);   // (15 - 16) * 2
  EXPECT_EQ(y[48], -2.0f);   // element 16: no fifth bit
  EXPECT_EQ(y[63], 30.0f);   // element 31: bit 31
}

// Q5_1 {d; m; qh[4]; qs[16]}, x = (nibble | bit << 4) * d + m.
TEST(DequantizeTest, Q5_1KnownBlock) {
  std::vector<uint8_t> b;
  PutU16(&b, kHalfHalf);
  PutU16(&b, kHalfTwo);
  PutU32(&b, 0xffff0000u);
  for (int j = 0; j < 16; ++j) b.push_back(static_cast<uint8_t>((15 - j) | (j << 4)));
  const std::vector<float> y = Dequant(GgmlType::kQ5_1, b);
  EXPECT_EQ(y[0], 9.5f);    // 15 * 0.5 + 2
  EXPECT_EQ(y[15], 2.0f);   // 0 * 0.5 + 2
  EXPECT_EQ(y[16], 10.0f);  // (0 | 16) * 0.5 + 2
  EXPECT_EQ(y[31], 17.5f);  // (15 | 16) * 0.5 + 2
}

// Q8_0 {d; i8 qs[32]}, x = q * d.
TEST(DequantizeTest, Q8_0KnownBlock) {
  std::vector<uint8_t> b;
  PutU16(&b, kHalfEighth);
  for (int j = 0; j < 32; ++j) b.push_back(static_cast<uint8_t>(static_cast<int8_t>(8 * j - 128)));
  const std::vector<float> y = Dequant(GgmlType::kQ8_0, b);
  EXPECT_EQ(y[0], -16.0f);  // -128 * 0.125
  EXPECT_EQ(y[16], 0.0f);
  EXPECT_EQ(y[31], 15.0f);  // 120 * 0.125
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], j - 16.0f) << j;
}

TEST(DequantizeTest, RejectsBadCountsAndTypes) {
  std::vector<uint8_t> data(34 * 2, 0);
  std::vector<float> out(64, 7.0f);
  EXPECT_THAT(Dequantize(GgmlType::kQ8_0, data.data(), 33, out.data()),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("33")));
  EXPECT_THAT(Dequantize(GgmlType::kQ4_1, data.data(), 16, out.data()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Dequantize(static_cast<GgmlType>(12), data.data(), 32, out.data()),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("12")));
  EXPECT_EQ(out[0], 7.0f);  // nothing written on error
  EXPECT_OK(Dequantize(GgmlType::kQ8_0, data.data(), 0, out.data()));
  EXPECT_EQ(out[0], 7.0f);
  EXPECT_TRUE(Quantize(GgmlType::kQ4_0, out.data(), 31).empty());
  EXPECT_TRUE(Quantize(static_cast<GgmlType>(12), out.data(), 32).empty());
}

// Blocks whose reference quantization is exact, with the bytes ggml's reference
// quantizers produce (sign convention of d, nibble order, qh bit order).
TEST(QuantizeTest, ExactBlocksMatchGgmlLayout) {
  std::vector<float> x(32);
  {  // Q4_0: values -8..7 and 7..-8; the largest magnitude is -8, so d = -8 / -8 = 1.
    for (int j = 0; j < 16; ++j) {
      x[j] = static_cast<float>(j - 8);
      x[j + 16] = static_cast<float>(7 - j);
    }
    const std::vector<uint8_t> q = Quantize(GgmlType::kQ4_0, x.data(), 32);
    ASSERT_EQ(q.size(), 18u);
    EXPECT_EQ(q[0] | (q[1] << 8), kHalfOne);
    for (int j = 0; j < 16; ++j) EXPECT_EQ(q[2 + j], j | ((15 - j) << 4)) << j;
    EXPECT_EQ(Dequant(GgmlType::kQ4_0, q), x);
  }
  {  // Q4_1: 1 + 0.25 * (j % 16): d = 3.75 / 15 = 0.25, m = 1.
    for (int j = 0; j < 32; ++j) x[j] = 1.0f + 0.25f * static_cast<float>(j % 16);
    const std::vector<uint8_t> q = Quantize(GgmlType::kQ4_1, x.data(), 32);
    ASSERT_EQ(q.size(), 20u);
    EXPECT_EQ(q[0] | (q[1] << 8), kHalfQuarter);
    EXPECT_EQ(q[2] | (q[3] << 8), kHalfOne);
    for (int j = 0; j < 16; ++j) EXPECT_EQ(q[4 + j], j | (j << 4)) << j;
    EXPECT_EQ(Dequant(GgmlType::kQ4_1, q), x);
  }
  {  // Q5_0: j - 16; the largest magnitude is -16, so d = 1 and q = j.
    for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 16);
    const std::vector<uint8_t> q = Quantize(GgmlType::kQ5_0, x.data(), 32);
    ASSERT_EQ(q.size(), 22u);
    EXPECT_EQ(q[0] | (q[1] << 8), kHalfOne);
    uint32_t qh;
    std::memcpy(&qh, &q[2], 4);
    EXPECT_EQ(qh, 0xffff0000u);  // elements 16..31 have q >= 16
    for (int j = 0; j < 16; ++j) EXPECT_EQ(q[6 + j], j | (j << 4)) << j;
    EXPECT_EQ(Dequant(GgmlType::kQ5_0, q), x);
  }
  {  // Q5_1: 0.5 * j: d = 15.5 / 31 = 0.5, m = 0.
    for (int j = 0; j < 32; ++j) x[j] = 0.5f * static_cast<float>(j);
    const std::vector<uint8_t> q = Quantize(GgmlType::kQ5_1, x.data(), 32);
    ASSERT_EQ(q.size(), 24u);
    EXPECT_EQ(q[0] | (q[1] << 8), kHalfHalf);
    EXPECT_EQ(q[2] | (q[3] << 8), 0);
    uint32_t qh;
    std::memcpy(&qh, &q[4], 4);
    EXPECT_EQ(qh, 0xffff0000u);
    for (int j = 0; j < 16; ++j) EXPECT_EQ(q[8 + j], j | (j << 4)) << j;
    EXPECT_EQ(Dequant(GgmlType::kQ5_1, q), x);
  }
  {  // Q8_0: 8j - 127 in [-127, 121]: d = 127 / 127 = 1.
    for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(8 * j - 127);
    const std::vector<uint8_t> q = Quantize(GgmlType::kQ8_0, x.data(), 32);
    ASSERT_EQ(q.size(), 34u);
    EXPECT_EQ(q[0] | (q[1] << 8), kHalfOne);
    for (int j = 0; j < 32; ++j) EXPECT_EQ(static_cast<int8_t>(q[2 + j]), 8 * j - 127) << j;
    EXPECT_EQ(Dequant(GgmlType::kQ8_0, q), x);
  }
}

// Largest error Quantize -> Dequantize may make on one block (values `x[0..32)`): half a
// step for rounding (a whole step where the symmetric types clamp the extreme of the
// opposite sign), plus the f16 rounding of the scale and offset.
float ErrorBound(GgmlType type, const float* x) {
  float lo = x[0], hi = x[0], amax = 0;
  for (int j = 0; j < 32; ++j) {
    lo = std::min(lo, x[j]);
    hi = std::max(hi, x[j]);
    amax = std::max(amax, std::fabs(x[j]));
  }
  const float f16 = std::ldexp(1.0f, -10);  // 2 x f16's relative rounding error
  switch (type) {
    case GgmlType::kQ4_0:
      return amax / 8 + amax * f16;
    case GgmlType::kQ5_0:
      return amax / 16 + amax * f16;
    case GgmlType::kQ4_1:
      return (hi - lo) / 15 * 0.5f + (std::fabs(lo) + std::fabs(hi)) * f16;
    case GgmlType::kQ5_1:
      return (hi - lo) / 31 * 0.5f + (std::fabs(lo) + std::fabs(hi)) * f16;
    case GgmlType::kQ8_0:
      return amax / 127 * 0.5f + amax * f16;
    default:
      return 0;
  }
}

TEST(QuantizeTest, RoundTripsWithinErrorBound) {
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x;
  for (int i = 0; i < 32 * 200; ++i) x.push_back(normal(rng) * (1 + i / 640));
  // Edge blocks: zeros, a constant, one outlier, all negative, tiny values, the extremes.
  for (int j = 0; j < 32; ++j) x.push_back(0.0f);
  for (int j = 0; j < 32; ++j) x.push_back(0.75f);
  for (int j = 0; j < 32; ++j) x.push_back(j == 5 ? 1000.0f : 0.01f * j);
  for (int j = 0; j < 32; ++j) x.push_back(-1.0f - 0.1f * j);
  for (int j = 0; j < 32; ++j) x.push_back(1e-3f * (j - 16));
  for (int j = 0; j < 32; ++j) x.push_back(j % 2 ? 60000.0f : -60000.0f);
  const uint64_t n = x.size();
  for (GgmlType type :
       {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ5_0, GgmlType::kQ5_1, GgmlType::kQ8_0}) {
    SCOPED_TRACE(GgmlTypeName(type));
    const std::vector<uint8_t> q = Quantize(type, x.data(), n);
    ASSERT_EQ(q.size(), n / 32 * GgmlBlockBytes(type));
    std::vector<float> y(n);
    ASSERT_OK(Dequantize(type, q.data(), n, y.data()));
    double worst_ratio = 0;
    for (uint64_t b = 0; b < n / 32; ++b) {
      const float bound = ErrorBound(type, &x[b * 32]) * 1.001f + 1e-30f;
      for (int j = 0; j < 32; ++j) {
        const float err = std::fabs(x[b * 32 + j] - y[b * 32 + j]);
        ASSERT_LE(err, bound) << "block " << b << " element " << j << ": " << x[b * 32 + j]
                              << " -> " << y[b * 32 + j];
        worst_ratio = std::max(worst_ratio, static_cast<double>(err / bound));
      }
    }
    EXPECT_GT(worst_ratio, 0.2);  // the bound is not vacuous
    // Zero and constant blocks come back exactly.
    for (int j = 0; j < 32; ++j) EXPECT_EQ(y[32 * 200 + j], 0.0f);
  }
  // F16 and F32 through the same entry points.
  std::vector<float> y(n);
  const std::vector<uint8_t> h = Quantize(GgmlType::kF16, x.data(), n);
  ASSERT_EQ(h.size(), 2 * n);
  ASSERT_OK(Dequantize(GgmlType::kF16, h.data(), n, y.data()));
  for (uint64_t i = 0; i < n; ++i) {
    ASSERT_LE(std::fabs(x[i] - y[i]), std::fabs(x[i]) * std::ldexp(1.0f, -11) + 1e-7f) << i;
  }
  const std::vector<uint8_t> f = Quantize(GgmlType::kF32, x.data(), n);
  ASSERT_OK(Dequantize(GgmlType::kF32, f.data(), n, y.data()));
  EXPECT_EQ(y, x);
}

// Not a benchmark: a guard against a pathologically slow path (the model's ~135M weights are
// dequantized at load). Prints the rate.
TEST(DequantizeTest, ThroughputSmoke) {
  const uint64_t n = uint64_t{1} << 22;  // 4M elements
  std::vector<float> x(n);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  std::vector<float> y(n);
  for (GgmlType type : {GgmlType::kQ4_1, GgmlType::kQ8_0, GgmlType::kQ5_0}) {
    const std::vector<uint8_t> q = Quantize(type, x.data(), n);
    const auto start = std::chrono::steady_clock::now();
    for (int rep = 0; rep < 3; ++rep) ASSERT_OK(Dequantize(type, q.data(), n, y.data()));
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / 3;
    std::printf("dequantize %s: %.0f M elements/s\n", GgmlTypeName(type), n / s / 1e6);
    EXPECT_LT(s, 1.0) << GgmlTypeName(type);  // > 4M elements/s even on a loaded machine
  }
}

}  // namespace
}  // namespace icecache::model
