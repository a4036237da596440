#include "server/index/simd.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace icecache::index {
namespace {

std::vector<uint8_t> RandomRows(ElemType type, uint32_t rows, uint32_t dim, uint32_t seed,
                                std::vector<float>* as_float) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<uint8_t> data(uint64_t{rows} * dim * ElemBytes(type));
  as_float->resize(uint64_t{rows} * dim);
  for (uint64_t i = 0; i < uint64_t{rows} * dim; ++i) {
    const float v = normal(rng);
    switch (type) {
      case ElemType::kF32:
        std::memcpy(data.data() + i * 4, &v, 4);
        (*as_float)[i] = v;
        break;
      case ElemType::kF16: {
        const uint16_t h = FloatToHalf(v);
        std::memcpy(data.data() + i * 2, &h, 2);
        (*as_float)[i] = HalfToFloat(h);
        break;
      }
      case ElemType::kBF16: {
        const uint16_t b = FloatToBf16(v);
        std::memcpy(data.data() + i * 2, &b, 2);
        (*as_float)[i] = Bf16ToFloat(b);
        break;
      }
    }
  }
  return data;
}

class SimdTest : public ::testing::TestWithParam<ElemType> {
 protected:
  void TearDown() override { SetSimdLevel(DetectSimdLevel()); }
};

// Every kernel, at every level, equals a float64 reference within float rounding, over odd
// and typical dims.
TEST_P(SimdTest, KernelsMatchFloat64Reference) {
  const ElemType type = GetParam();
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2}) {
    if (SetSimdLevel(level) != level) continue;  // CPU without AVX2: scalar only
    for (uint32_t dim : {1u, 7u, 8u, 33u, 64u, 128u, 130u, 256u}) {
      const uint32_t rows = 9;
      std::vector<float> ref_rows, x;
      std::vector<uint8_t> data = RandomRows(type, rows, dim, dim * 31 + 1, &ref_rows);
      RandomRows(ElemType::kF32, 1, dim, dim * 17 + 5, &x);
      const uint64_t stride = uint64_t{dim} * ElemBytes(type);
      std::vector<float> strided(rows), gathered(rows);
      std::vector<const void*> ptrs(rows);
      for (uint32_t r = 0; r < rows; ++r) ptrs[r] = data.data() + (rows - 1 - r) * stride;
      DotStrided(x.data(), data.data(), stride, rows, type, dim, strided.data());
      DotGather(x.data(), ptrs.data(), rows, type, dim, gathered.data());
      for (uint32_t r = 0; r < rows; ++r) {
        double dot = 0, sq = 0, mag = 0;
        for (uint32_t i = 0; i < dim; ++i) {
          dot += double(x[i]) * ref_rows[uint64_t{r} * dim + i];
          mag += std::fabs(double(x[i]) * ref_rows[uint64_t{r} * dim + i]);
          sq += double(ref_rows[uint64_t{r} * dim + i]) * ref_rows[uint64_t{r} * dim + i];
        }
        const double tol = 1e-5 * (mag + 1);
        const void* row = data.data() + r * stride;
        EXPECT_NEAR(Dot(x.data(), row, type, dim), dot, tol) << dim << " " << SimdLevelName(level);
        EXPECT_NEAR(strided[r], dot, tol);
        EXPECT_NEAR(gathered[rows - 1 - r], dot, tol);
        EXPECT_NEAR(SquaredNorm(row, type, dim), sq, 1e-5 * (sq + 1));
        std::vector<float> f(dim);
        ToFloat(row, type, dim, f.data());
        for (uint32_t i = 0; i < dim; ++i) EXPECT_EQ(f[i], ref_rows[uint64_t{r} * dim + i]);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllTypes, SimdTest,
                         ::testing::Values(ElemType::kF32, ElemType::kF16, ElemType::kBF16),
                         [](const auto& p) { return std::string(ElemTypeName(p.param)); });

TEST(SimdLevels, Avx2AndScalarAgree) {
  if (DetectSimdLevel() != SimdLevel::kAvx2) GTEST_SKIP() << "CPU has no AVX2";
  std::vector<float> rows_f, x;
  std::vector<uint8_t> rows = RandomRows(ElemType::kBF16, 64, 128, 3, &rows_f);
  RandomRows(ElemType::kF32, 1, 128, 4, &x);
  std::vector<float> a(64), b(64);
  SetSimdLevel(SimdLevel::kScalar);
  DotStrided(x.data(), rows.data(), 256, 64, ElemType::kBF16, 128, a.data());
  SetSimdLevel(SimdLevel::kAvx2);
  DotStrided(x.data(), rows.data(), 256, 64, ElemType::kBF16, 128, b.data());
  for (int i = 0; i < 64; ++i) EXPECT_NEAR(a[i], b[i], 1e-4f * (std::fabs(a[i]) + 1));
}

TEST(HalfConversion, ExactValuesAndSpecials) {
  for (float v : {0.f, -0.f, 1.f, -2.5f, 65504.f, 6.103515625e-05f, 5.960464477539063e-08f}) {
    EXPECT_EQ(HalfToFloat(FloatToHalf(v)), v) << v;
  }
  EXPECT_EQ(FloatToHalf(1e6f), 0x7c00);   // overflow -> +inf
  EXPECT_EQ(FloatToHalf(-1e6f), 0xfc00);  // -inf
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(std::nanf("")))));
  // Half steps at 1.0 are 4/4096: round to nearest, ties to even.
  EXPECT_EQ(FloatToHalf(1.0f + 1.0f / 4096), 0x3c00);
  EXPECT_EQ(FloatToHalf(1.0f + 3.0f / 4096), 0x3c01);
  EXPECT_EQ(FloatToHalf(1.0f + 2.0f / 4096), 0x3c00);  // tie: to even (down)
  EXPECT_EQ(FloatToHalf(1.0f + 6.0f / 4096), 0x3c02);  // tie: to even (up)
  for (uint32_t h = 0; h < 0x7c00; ++h) {              // every finite positive half round-trips
    ASSERT_EQ(FloatToHalf(HalfToFloat(static_cast<uint16_t>(h))), h) << h;
  }
}

TEST(Bf16Conversion, RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(-3.5f)), -3.5f);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::infinity()), 0x7f80);
}

}  // namespace
}  // namespace icecache::index
