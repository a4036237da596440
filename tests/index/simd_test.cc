#include "server/index/simd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "server/index/sketch.h"

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
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvxVnni,
                          SimdLevel::kAvx512, SimdLevel::kAvx512Vnni}) {
    if (SetSimdLevel(level) != level) continue;  // levels this CPU lacks: skipped
    for (uint32_t dim : {1u, 7u, 8u, 33u, 64u, 128u, 130u, 256u}) {
      for (uint32_t rows : {1u, 3u, 4u, 9u}) {  // the four-row blocks and their remainders
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
          EXPECT_NEAR(Dot(x.data(), row, type, dim), dot, tol)
              << dim << " " << SimdLevelName(level);
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
}

// The weighted row sums, at every level, equal a float64 reference within float rounding:
// groups of 1 to 9 weight vectors (the AVX2 kernel's blocks of 4 and their remainders), odd
// and typical dims (its 16- and 8-column passes and the scalar columns), rows at a stride
// wider than a row, zero weights, and accumulation into what out held.
TEST_P(SimdTest, WeightedSumsMatchFloat64Reference) {
  const ElemType type = GetParam();
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    if (SetSimdLevel(level) != level) continue;
    for (uint32_t dim : {1u, 7u, 8u, 24u, 33u, 64u, 80u, 128u, 200u}) {
      for (uint32_t nq : {1u, 3u, 4u, 5u, 9u}) {
        const uint32_t rows = 37, pad = 3;  // stride: dim + pad elements
        std::vector<float> ref_rows, w, start;
        std::vector<uint8_t> data = RandomRows(type, rows, dim + pad, dim * 7 + nq, &ref_rows);
        RandomRows(ElemType::kF32, nq, rows + 2, dim + nq * 13, &w);  // w_stride rows + 2
        for (uint32_t j = 0; j < nq; ++j) w[uint64_t{j} * (rows + 2) + 5] = 0.0f;
        RandomRows(ElemType::kF32, nq, dim, dim + 99, &start);
        std::vector<float> out = start;
        const uint64_t stride = uint64_t{dim + pad} * ElemBytes(type);
        WeightedSumStridedMulti(w.data(), nq, rows + 2, data.data(), stride, rows, type, dim,
                                out.data());
        for (uint32_t j = 0; j < nq; ++j) {
          for (uint32_t c = 0; c < dim; ++c) {
            double want = start[uint64_t{j} * dim + c], mag = std::fabs(want);
            for (uint32_t i = 0; i < rows; ++i) {
              const double t =
                  double(w[uint64_t{j} * (rows + 2) + i]) * ref_rows[uint64_t{i} * (dim + pad) + c];
              want += t;
              mag += std::fabs(t);
            }
            ASSERT_NEAR(out[uint64_t{j} * dim + c], want, 1e-5 * (mag + 1))
                << "dim " << dim << " nq " << nq << " query " << j << " column " << c << " "
                << SimdLevelName(level);
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllTypes, SimdTest,
                         ::testing::Values(ElemType::kF32, ElemType::kF16, ElemType::kBF16),
                         [](const auto& p) { return std::string(ElemTypeName(p.param)); });

// The AVX-512 weighted sums keep the AVX2 kernel's per-column order of FMAs (one accumulator
// per column block, rows in order), so they equal it bit for bit: the tail estimate's value
// sums and the clustered build's PCA passes give the same answers at either level. Every elem
// type, groups of 1 to 9 (blocks of 4 and remainders), dims through the 64-, 16- and 8-column
// blocks and the scalar columns.
TEST(SimdLevels, Avx512WeightedSumsEqualAvx2BitForBit) {
  if (!SimdLevelSupported(SimdLevel::kAvx512)) GTEST_SKIP() << "this CPU has no AVX-512 F+BW";
  for (ElemType type : {ElemType::kF32, ElemType::kF16, ElemType::kBF16}) {
    for (uint32_t dim : {8u, 24u, 64u, 100u, 128u, 200u}) {
      for (uint32_t nq : {1u, 2u, 4u, 5u, 9u}) {
        const uint32_t rows = 41;
        std::vector<float> rows_f, w, start;
        std::vector<uint8_t> data = RandomRows(type, rows, dim, dim * 3 + nq, &rows_f);
        RandomRows(ElemType::kF32, nq, rows, dim + nq, &w);
        RandomRows(ElemType::kF32, nq, dim, dim + 7, &start);
        const uint64_t stride = uint64_t{dim} * ElemBytes(type);
        std::vector<float> avx2 = start, avx512 = start;
        SetSimdLevel(SimdLevel::kAvx2);
        WeightedSumStridedMulti(w.data(), nq, rows, data.data(), stride, rows, type, dim,
                                avx2.data());
        SetSimdLevel(SimdLevel::kAvx512);
        WeightedSumStridedMulti(w.data(), nq, rows, data.data(), stride, rows, type, dim,
                                avx512.data());
        for (size_t i = 0; i < avx2.size(); ++i) {
          ASSERT_EQ(avx512[i], avx2[i])
              << ElemTypeName(type) << " dim " << dim << " nq " << nq << " element " << i;
        }
      }
    }
  }
  SetSimdLevel(DetectSimdLevel());
}

TEST(SimdLevels, Avx2AndScalarAgree) {
  if (!SimdLevelSupported(SimdLevel::kAvx2)) GTEST_SKIP() << "this CPU has no AVX2+FMA+F16C";
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

// The multi-query kernels at `level` against the scalar path: every elem type, group sizes
// 1..9, dims with and without a 16-wide tail, strided and gathered rows.
void ExpectMultiDotsMatchScalar(SimdLevel level) {
  for (ElemType type : {ElemType::kF32, ElemType::kF16, ElemType::kBF16}) {
    for (uint32_t dim : {8u, 64u, 72u, 128u, 136u}) {
      for (uint32_t nq : {1u, 3u, 4u, 9u}) {
        const uint32_t rows = 13;
        std::vector<float> rows_f, xs;
        std::vector<uint8_t> data = RandomRows(type, rows, dim, dim + nq, &rows_f);
        RandomRows(ElemType::kF32, nq, dim, 7 * dim + nq, &xs);
        const uint64_t stride = uint64_t{dim} * ElemBytes(type);
        std::vector<const void*> ptrs(rows);
        for (uint32_t r = 0; r < rows; ++r) ptrs[r] = data.data() + (rows - 1 - r) * stride;
        std::vector<float> want_s(nq * rows), want_g(nq * rows), got_s(nq * rows), got_g(nq * rows);
        ASSERT_EQ(SetSimdLevel(SimdLevel::kScalar), SimdLevel::kScalar);
        DotStridedMulti(xs.data(), nq, data.data(), stride, rows, type, dim, want_s.data(), rows);
        DotGatherMulti(xs.data(), nq, ptrs.data(), rows, type, dim, want_g.data(), rows);
        const float want_one = Dot(xs.data(), data.data(), type, dim);
        ASSERT_EQ(SetSimdLevel(level), level);
        DotStridedMulti(xs.data(), nq, data.data(), stride, rows, type, dim, got_s.data(), rows);
        DotGatherMulti(xs.data(), nq, ptrs.data(), rows, type, dim, got_g.data(), rows);
        for (uint32_t i = 0; i < nq * rows; ++i) {
          EXPECT_NEAR(got_s[i], want_s[i], 1e-4f * (std::fabs(want_s[i]) + dim)) << dim;
          EXPECT_NEAR(got_g[i], want_g[i], 1e-4f * (std::fabs(want_g[i]) + dim)) << dim;
        }
        EXPECT_NEAR(Dot(xs.data(), data.data(), type, dim), want_one,
                    1e-4f * (std::fabs(want_one) + dim));
      }
    }
  }
  SetSimdLevel(DetectSimdLevel());
}

// SketchDots at `level` equals the scalar integer sums exactly: random codes and int8 queries
// (the extremes included), code lengths 64..512 bits, 1..9 queries.
void ExpectSketchDotsEqualScalar(SimdLevel level) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> byte(0, 255), q(-127, 127);
  for (uint32_t bits : {64u, 128u, 192u, 512u}) {
    for (uint32_t nq : {1u, 2u, 4u, 5u, 9u}) {
      const uint32_t n = 37;
      std::vector<uint8_t> codes(uint64_t{n} * bits / 8);
      for (uint8_t& c : codes) c = static_cast<uint8_t>(byte(rng));
      for (uint32_t b = 0; b < bits / 8; ++b) codes[b] = 0xff;          // code 0: every bit set
      for (uint32_t b = 0; b < bits / 8; ++b) codes[bits / 8 + b] = 0;  // code 1: none
      std::vector<int8_t> q8(uint64_t{nq} * bits);
      for (int8_t& v : q8) v = static_cast<int8_t>(q(rng));
      for (uint32_t b = 0; b < bits; ++b) q8[b] = b % 2 ? 127 : -127;
      std::vector<int32_t> want(uint64_t{nq} * n), got(uint64_t{nq} * n, -1);
      ASSERT_EQ(SetSimdLevel(SimdLevel::kScalar), SimdLevel::kScalar);
      SketchDots(q8.data(), nq, bits, codes.data(), n, want.data(), n);
      ASSERT_EQ(SetSimdLevel(level), level);
      SketchDots(q8.data(), nq, bits, codes.data(), n, got.data(), n);
      EXPECT_EQ(got, want) << bits << " bits, " << nq << " queries, " << SimdLevelName(level);
      // The scalar path against a direct count for the all-set and empty codes.
      int32_t all = 0;
      for (uint32_t b = 0; b < bits; ++b) all += q8[b];
      EXPECT_EQ(want[0], all);
      EXPECT_EQ(want[1], 0);
    }
  }
  SetSimdLevel(DetectSimdLevel());
}

TEST(SimdLevels, DetectionAndClamping) {
  const SimdLevel best = DetectSimdLevel();
  EXPECT_TRUE(SimdLevelSupported(best));
  EXPECT_TRUE(SimdLevelSupported(SimdLevel::kScalar));
  // Forcing the top level lands on the best supported level at or below it.
  const SimdLevel top = SetSimdLevel(SimdLevel::kAvx512Vnni);
  EXPECT_TRUE(SimdLevelSupported(top));
  EXPECT_LE(static_cast<int>(top), static_cast<int>(SimdLevel::kAvx512Vnni));
  EXPECT_EQ(SetSimdLevel(SimdLevel::kScalar), SimdLevel::kScalar);
  EXPECT_STREQ(SimdLevelName(SimdLevel::kAvx512Vnni), "avx512f+bw+vnni");
  SetSimdLevel(best);
}

TEST(SketchDots, ScalarCountsTheSetBits) {
  SetSimdLevel(SimdLevel::kScalar);
  std::vector<int8_t> q8(64);
  for (int i = 0; i < 64; ++i) q8[i] = static_cast<int8_t>(i - 32);
  const uint64_t word = (1ull << 0) | (1ull << 5) | (1ull << 63);
  uint8_t code[8];
  std::memcpy(code, &word, 8);
  int32_t out = 0;
  SketchDots(q8.data(), 1, 64, code, 1, &out, 1);
  EXPECT_EQ(out, (0 - 32) + (5 - 32) + (63 - 32));
  SetSimdLevel(DetectSimdLevel());
}

TEST(SketchDots, Avx2EqualsScalar) {
  if (!SimdLevelSupported(SimdLevel::kAvx2)) GTEST_SKIP() << "this CPU has no AVX2+FMA+F16C";
  ExpectSketchDotsEqualScalar(SimdLevel::kAvx2);
}

TEST(SketchDots, AvxVnniEqualsScalar) {
  if (!SimdLevelSupported(SimdLevel::kAvxVnni)) GTEST_SKIP() << "this CPU has no AVX-VNNI";
  ExpectSketchDotsEqualScalar(SimdLevel::kAvxVnni);
}

TEST(SketchDots, Avx512EqualsScalar) {
  if (!SimdLevelSupported(SimdLevel::kAvx512)) GTEST_SKIP() << "this CPU has no AVX-512 F+BW";
  ExpectSketchDotsEqualScalar(SimdLevel::kAvx512);
}

TEST(SketchDots, Avx512VnniEqualsScalar) {
  if (!SimdLevelSupported(SimdLevel::kAvx512Vnni)) {
    GTEST_SKIP() << "this CPU has no AVX-512 VNNI";
  }
  ExpectSketchDotsEqualScalar(SimdLevel::kAvx512Vnni);
}

// The fast-scan layout round-trips, block tails included, and pads with zero codes.
TEST(SketchFastScan, PackedLayoutRoundTrips) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint32_t bits : {64u, 128u, 256u}) {
    for (uint32_t n : {1u, 7u, 15u, 16u, 17u, 31u, 32u, 33u, 100u}) {
      std::vector<uint8_t> codes(uint64_t{n} * bits / 8), back(codes.size(), 0x5a);
      for (uint8_t& c : codes) c = static_cast<uint8_t>(byte(rng));
      std::vector<uint8_t> packed(PackedSketchBytes(n, bits), 0x77);
      ASSERT_EQ(packed.size() % (uint64_t{kSketchBlockKeys} * bits / 8), 0u);
      ASSERT_GE(packed.size(), codes.size());
      PackSketchCodes(codes.data(), n, bits, packed.data());
      UnpackSketchCodes(packed.data(), n, bits, back.data());
      EXPECT_EQ(back, codes) << bits << " bits, " << n << " keys";
      // Byte p of key i at block i / 16, row p, column i % 16; the padding keys are zero.
      for (uint32_t i = 0; i < (n + 15) / 16 * 16; ++i) {
        for (uint32_t p = 0; p < bits / 8; ++p) {
          const uint8_t got = packed[uint64_t{i / 16} * bits * 2 + p * 16 + i % 16];
          ASSERT_EQ(got, i < n ? codes[uint64_t{i} * bits / 8 + p] : 0) << i << " " << p;
        }
      }
    }
  }
}

// The tables: entry (g, v) minus the bias share of g is the sum of q8 under v's bits.
// Inserting one code in the packed layout, in place, gives exactly the bytes that unpacking,
// inserting the row and packing again gives (padding included), at every position, across
// block boundaries and when the insert adds a block.
TEST(SketchFastScan, InPlaceInsertEqualsRepacking) {
  std::mt19937 rng(5);
  for (uint32_t bits : {64u, 128u, 256u}) {
    const uint32_t cb = bits / 8;
    for (uint32_t n : {1u, 2u, 15u, 16u, 17u, 31u, 32u, 33u, 50u}) {
      std::vector<uint8_t> rows(uint64_t{n} * cb);
      for (uint8_t& b : rows) b = static_cast<uint8_t>(rng());
      std::vector<uint8_t> packed(PackedSketchBytes(n, bits));
      PackSketchCodes(rows.data(), n, bits, packed.data());
      for (uint32_t idx = 0; idx <= n; ++idx) {
        std::vector<uint8_t> code(cb);
        for (uint8_t& b : code) b = static_cast<uint8_t>(rng());
        std::vector<uint8_t> want_rows = rows;
        want_rows.insert(want_rows.begin() + uint64_t{idx} * cb, code.begin(), code.end());
        std::vector<uint8_t> want(PackedSketchBytes(n + 1, bits));
        PackSketchCodes(want_rows.data(), n + 1, bits, want.data());
        std::vector<uint8_t> got = packed;
        got.resize(PackedSketchBytes(n + 1, bits), 0);
        InsertPackedSketchCode(got.data(), n + 1, bits, idx, code.data());
        ASSERT_EQ(got, want) << "insert bits " << bits << " n " << n << " idx " << idx;
      }
    }
  }
}

TEST(SketchFastScan, TablesHoldTheGroupSums) {
  std::vector<int8_t> q8(64);
  for (int i = 0; i < 64; ++i) q8[i] = static_cast<int8_t>((i * 37) % 127 - 63);
  std::vector<uint8_t> luts(64 * 4);
  int32_t bias = 0;
  BuildSketchLuts(q8.data(), 64, luts.data(), &bias);
  int32_t neg = 0;
  for (int8_t v : q8) neg += std::min<int>(v, 0);
  EXPECT_EQ(bias, neg);
  for (uint32_t g = 0; g < 16; ++g) {
    int32_t mn = 0;
    for (int i = 0; i < 4; ++i) mn += std::min<int>(q8[4 * g + i], 0);
    for (uint32_t v = 0; v < 16; ++v) {
      int32_t want = 0;
      for (int i = 0; i < 4; ++i) want += ((v >> i) & 1) ? q8[4 * g + i] : 0;
      EXPECT_EQ(luts[SketchLutOffset(g) + v] + mn, want) << g << " " << v;
    }
  }
}

// SketchDotsPacked at `level` equals SketchDots on the row-major codes (scalar) exactly:
// random codes and 7-bit queries (the extremes included), tails of 1-15 keys, 1..9 queries.
void ExpectPackedSketchDotsEqualRowMajor(SimdLevel level) {
  std::mt19937 rng(13);
  std::uniform_int_distribution<int> byte(0, 255), q(-63, 63);
  for (uint32_t bits : {64u, 128u, 256u, 512u, 1024u, 2048u}) {
    for (uint32_t nq : {1u, 2u, 3u, 4u, 5u, 9u}) {
      for (uint32_t n : {1u, 15u, 16u, 17u, 33u, 100u}) {
        std::vector<uint8_t> codes(uint64_t{n} * bits / 8);
        for (uint8_t& c : codes) c = static_cast<uint8_t>(byte(rng));
        for (uint32_t b = 0; b < bits / 8; ++b) codes[b] = 0xff;  // key 0: every bit set
        if (n > 1) {
          for (uint32_t b = 0; b < bits / 8; ++b) codes[bits / 8 + b] = 0;  // key 1: none
        }
        std::vector<int8_t> q8(uint64_t{nq} * bits);
        for (int8_t& v : q8) v = static_cast<int8_t>(q(rng));
        for (uint32_t b = 0; b < bits; ++b) q8[b] = b % 3 ? 63 : -63;
        std::vector<uint8_t> luts(uint64_t{nq} * bits * 4);
        std::vector<int32_t> bias(nq);
        for (uint32_t j = 0; j < nq; ++j) {
          BuildSketchLuts(q8.data() + uint64_t{j} * bits, bits,
                          luts.data() + uint64_t{j} * bits * 4, &bias[j]);
        }
        std::vector<uint8_t> packed(PackedSketchBytes(n, bits));
        PackSketchCodes(codes.data(), n, bits, packed.data());
        const uint32_t stride = n + 3;  // out_stride wider than n: nothing written past n
        std::vector<int32_t> want(uint64_t{nq} * stride, -7), got(uint64_t{nq} * stride, -7);
        ASSERT_EQ(SetSimdLevel(SimdLevel::kScalar), SimdLevel::kScalar);
        SketchDots(q8.data(), nq, bits, codes.data(), n, want.data(), stride);
        ASSERT_EQ(SetSimdLevel(level), level);
        SketchDotsPacked(luts.data(), bias.data(), nq, bits, packed.data(), n, got.data(), stride);
        ASSERT_EQ(got, want) << bits << " bits, " << nq << " queries, " << n << " keys, "
                             << SimdLevelName(level);
      }
    }
  }
  SetSimdLevel(DetectSimdLevel());
}

TEST(SketchFastScan, ScalarEqualsRowMajor) {
  ExpectPackedSketchDotsEqualRowMajor(SimdLevel::kScalar);
}

TEST(SketchFastScan, Avx2EqualsRowMajor) {
  if (!SimdLevelSupported(SimdLevel::kAvx2)) GTEST_SKIP() << "this CPU has no AVX2+FMA+F16C";
  ExpectPackedSketchDotsEqualRowMajor(SimdLevel::kAvx2);
}

// The levels above AVX2 run the AVX2 fast-scan kernel; checked at the best level this CPU has.
TEST(SketchFastScan, BestLevelEqualsRowMajor) {
  ExpectPackedSketchDotsEqualRowMajor(DetectSimdLevel());
}

// SketchCandidatesAbove at `level` against a float64 evaluation of its formula: every
// candidate's estimate within float rounding, exactly the keys whose float64 estimate beats the
// floor (the floor is put halfway between two neighbouring estimates, so rounding cannot move
// a key across it), in ascending order with their own tokens, nothing written past the count;
// the same candidates as the scalar path's, their estimates within float rounding of its (the
// SIMD paths may fuse the multiply-add). n with and without 8- and 16-key tails,
// floors that pass none, some and all, estimates of both signs.
void ExpectCandidatesAboveMatchFloat64(SimdLevel level) {
  std::mt19937 rng(29);
  std::uniform_int_distribution<int32_t> dot(0, 4000);
  std::normal_distribution<float> fac_dist(0.f, 0.05f);
  for (uint32_t n : {1u, 7u, 8u, 15u, 16u, 17u, 31u, 33u, 100u, 257u}) {
    std::vector<int32_t> dots(n);
    std::vector<uint16_t> fac(n);
    std::vector<uint32_t> tok(n);
    for (uint32_t i = 0; i < n; ++i) {
      dots[i] = dot(rng);
      fac[i] = FloatToHalf(std::fabs(fac_dist(rng)) + 1e-3f);
      tok[i] = 1000003u * (i + 1) % 65521u + (i % 3 == 0 ? 0xfff00000u : 0u);  // distinct
    }
    const float base = 0.375f, scale = 0.0123f;
    const int32_t sum = 2100;
    std::vector<double> want(n);
    for (uint32_t i = 0; i < n; ++i) {
      want[i] = base + double{HalfToFloat(fac[i])} * scale * (2.0 * dots[i] - sum);
    }
    std::vector<double> sorted = want;
    std::sort(sorted.begin(), sorted.end());
    if (n >= 16) {  // negative estimates too (their keys are ~bits)
      ASSERT_LT(sorted.front(), 0.0);
      ASSERT_GT(sorted.back(), 0.0);
    }
    // Floors: below every estimate, between the 1st and 2nd largest... and above every one.
    std::vector<double> floors = {sorted.front() - 1.0, sorted.back() + 1.0};
    for (uint32_t r : {n / 2, n - n / 8 - 1, n - 1 - std::min(n - 1, 1u)}) {
      if (r + 1 < n && sorted[r + 1] - sorted[r] > 1e-4 * (std::fabs(sorted[r]) + 1)) {
        floors.push_back((sorted[r] + sorted[r + 1]) / 2);
      }
    }
    for (double fl : floors) {
      const uint64_t kUnwritten = 0xdeadbeefdeadbeefull;
      std::vector<uint64_t> scalar(n + 16, kUnwritten), out(n + 16, kUnwritten);
      ASSERT_EQ(SetSimdLevel(SimdLevel::kScalar), SimdLevel::kScalar);
      const uint32_t ms = SketchCandidatesAbove(dots.data(), fac.data(), tok.data(), n, base, scale,
                                                sum, static_cast<float>(fl), scalar.data());
      ASSERT_EQ(SetSimdLevel(level), level);
      const uint32_t m = SketchCandidatesAbove(dots.data(), fac.data(), tok.data(), n, base, scale,
                                               sum, static_cast<float>(fl), out.data());
      std::vector<uint32_t> want_above;
      for (uint32_t i = 0; i < n; ++i) {
        if (want[i] > fl) want_above.push_back(i);
      }
      ASSERT_EQ(m, want_above.size()) << n << " keys, floor " << fl << ", " << SimdLevelName(level);
      ASSERT_EQ(ms, m);
      for (uint32_t a = 0; a < m; ++a) {
        const uint32_t i = want_above[a];
        EXPECT_EQ(RankKeyId(out[a]), tok[i]) << a << " of " << m;
        EXPECT_NEAR(RankKeyValue(out[a]), want[i], 1e-5 * (std::fabs(want[i]) + 1));
        EXPECT_EQ(RankKeyId(out[a]), RankKeyId(scalar[a]));
        EXPECT_NEAR(RankKeyValue(out[a]), RankKeyValue(scalar[a]), 1e-6 * (std::fabs(want[i]) + 1));
      }
      for (uint32_t a = m; a < n + 16; ++a)
        EXPECT_EQ(out[a], kUnwritten) << "written past the count";
    }
  }
  SetSimdLevel(DetectSimdLevel());
}

TEST(SketchCandidates, ScalarMatchesFloat64) {
  ExpectCandidatesAboveMatchFloat64(SimdLevel::kScalar);
}

TEST(SketchCandidates, Avx2MatchesFloat64AndScalar) {
  if (!SimdLevelSupported(SimdLevel::kAvx2)) GTEST_SKIP() << "this CPU has no AVX2+FMA+F16C";
  ExpectCandidatesAboveMatchFloat64(SimdLevel::kAvx2);
}

TEST(SketchCandidates, Avx512MatchesFloat64AndScalar) {
  if (!SimdLevelSupported(SimdLevel::kAvx512)) GTEST_SKIP() << "this CPU has no AVX-512 F+BW";
  ExpectCandidatesAboveMatchFloat64(SimdLevel::kAvx512);
}

// A candidate key orders as (estimate descending, token ascending) and gives both back; the
// integer order of OrderedFloatBits is the floats' order, -0 and +0 equal, every value back.
TEST(SketchCandidates, KeysOrderByEstimateThenLowerToken) {
  const float inf = std::numeric_limits<float>::infinity();
  const float denorm = std::numeric_limits<float>::denorm_min();
  const std::vector<float> ascending = {-inf,   -3e38f, -2.5f, -1.0f,      -1e-30f, -denorm, 0.0f,
                                        denorm, 1e-30f, 1.0f,  1.0000001f, 3e38f,   inf};
  for (size_t i = 0; i < ascending.size(); ++i) {
    EXPECT_EQ(FromOrderedFloatBits(OrderedFloatBits(ascending[i])), ascending[i]);
    if (i > 0) {
      EXPECT_LT(OrderedFloatBits(ascending[i - 1]), OrderedFloatBits(ascending[i])) << i;
    }
  }
  EXPECT_EQ(OrderedFloatBits(-0.0f), OrderedFloatBits(0.0f));
  EXPECT_FALSE(std::signbit(FromOrderedFloatBits(OrderedFloatBits(-0.0f))));
  // Larger estimate first; equal estimates: the lower token first; tokens 0 and 2^32 - 1.
  EXPECT_GT(RankKey(1.5f, 7), RankKey(1.25f, 3));
  EXPECT_GT(RankKey(-1.25f, 0xffffffffu), RankKey(-1.5f, 0));
  EXPECT_GT(RankKey(2.0f, 3), RankKey(2.0f, 4));
  EXPECT_GT(RankKey(2.0f, 0), RankKey(2.0f, 0xffffffffu));
  EXPECT_EQ(RankKey(-0.0f, 5), RankKey(0.0f, 5));
  for (uint32_t tok : {0u, 1u, 123456u, 0xffffffffu}) {
    EXPECT_EQ(RankKeyId(RankKey(-2.75f, tok)), tok);
    EXPECT_EQ(RankKeyValue(RankKey(-2.75f, tok)), -2.75f);
  }
}

TEST(SimdLevels, Avx2MultiDotsMatchScalar) {
  if (!SimdLevelSupported(SimdLevel::kAvx2)) GTEST_SKIP() << "this CPU has no AVX2+FMA+F16C";
  ExpectMultiDotsMatchScalar(SimdLevel::kAvx2);
}

TEST(SimdLevels, Avx512MultiDotsMatchScalar) {
  if (!SimdLevelSupported(SimdLevel::kAvx512)) GTEST_SKIP() << "this CPU has no AVX-512 F+BW";
  ExpectMultiDotsMatchScalar(SimdLevel::kAvx512);
}

// At every level of this CPU, a multi-query dot (2..9 queries) of a row does not depend on
// where the row sits in the call: the same floats, bit for bit, for the row scored among 13
// strided rows, alone, and gathered in reverse order (the search rescoring gathered rows must
// rank them exactly as the exact scan's strided pages do). Each elem type, dims with and
// without a 16-wide tail.
TEST(SimdLevels, MultiDotsOfARowDoNotDependOnItsPlaceInTheCall) {
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvxVnni,
                          SimdLevel::kAvx512, SimdLevel::kAvx512Vnni}) {
    if (!SimdLevelSupported(level)) continue;
    ASSERT_EQ(SetSimdLevel(level), level);
    for (ElemType type : {ElemType::kF32, ElemType::kF16, ElemType::kBF16}) {
      for (uint32_t dim : {64u, 72u, 128u}) {
        for (uint32_t nq : {2u, 3u, 4u, 5u, 8u, 9u}) {
          const uint32_t rows = 13;
          std::vector<float> rows_f, xs;
          std::vector<uint8_t> data = RandomRows(type, rows, dim, 3 * dim + nq, &rows_f);
          RandomRows(ElemType::kF32, nq, dim, 5 * dim + nq, &xs);
          const uint64_t stride = uint64_t{dim} * ElemBytes(type);
          std::vector<const void*> reversed(rows);
          for (uint32_t r = 0; r < rows; ++r) reversed[r] = data.data() + (rows - 1 - r) * stride;
          std::vector<float> all(nq * rows), gathered(nq * rows), one(nq);
          DotStridedMulti(xs.data(), nq, data.data(), stride, rows, type, dim, all.data(), rows);
          DotGatherMulti(xs.data(), nq, reversed.data(), rows, type, dim, gathered.data(), rows);
          for (uint32_t r = 0; r < rows; ++r) {
            DotStridedMulti(xs.data(), nq, data.data() + r * stride, stride, 1, type, dim,
                            one.data(), 1);
            for (uint32_t j = 0; j < nq; ++j) {
              const float at = all[j * rows + r];
              EXPECT_EQ(one[j], at) << SimdLevelName(level) << " " << ElemTypeName(type) << " dim "
                                    << dim << " nq " << nq << " row " << r << " query " << j;
              EXPECT_EQ(gathered[j * rows + rows - 1 - r], at)
                  << SimdLevelName(level) << " " << ElemTypeName(type) << " dim " << dim << " nq "
                  << nq << " row " << r << " query " << j;
            }
          }
        }
      }
    }
  }
  SetSimdLevel(DetectSimdLevel());
}

// The sketch's rotation: against a float64 Walsh-Hadamard transform (H[i][j] = (-1)^popcount(i
// & j)), and bit-identical between the scalar and the AVX2 level (the codes of a key must not
// depend on the machine that built them), for dims below, at and not at a power of two.
TEST(SketchRotation, SignedFwhtMatchesFloat64AndIsBitIdenticalAcrossLevels) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.5f);
  for (const auto& [dim, n] :
       {std::pair{5u, 8u}, {64u, 64u}, {96u, 128u}, {128u, 128u}, {200u, 256u}, {256u, 256u}}) {
    std::vector<float> x(dim), signs(n);
    for (float& v : x) v = normal(rng);
    for (float& s : signs) s = (rng() & 1) ? 1.f : -1.f;
    const float scale = 1.0f / std::sqrt(static_cast<float>(n));
    std::vector<float> scalar(n), avx2(n);
    SetSimdLevel(SimdLevel::kScalar);
    SignedFwht(x.data(), signs.data(), dim, n, scale, scalar.data());
    for (uint32_t i = 0; i < n; ++i) {
      double ref = 0;
      for (uint32_t j = 0; j < dim; ++j) {
        ref += (__builtin_popcount(i & j) % 2 ? -1.0 : 1.0) * double(x[j]) * signs[j];
      }
      ref *= scale;
      EXPECT_NEAR(scalar[i], ref, 1e-5 * std::sqrt(double(dim)) * 4) << dim << " " << i;
    }
    if (SimdLevelSupported(SimdLevel::kAvx2)) {
      SetSimdLevel(SimdLevel::kAvx2);
      SignedFwht(x.data(), signs.data(), dim, n, scale, avx2.data());
      EXPECT_EQ(std::memcmp(scalar.data(), avx2.data(), n * sizeof(float)), 0) << "dim " << dim;
    }
    SetSimdLevel(DetectSimdLevel());
  }
}

// SignCode: bit i % 8 of byte i / 8 set exactly where y[i] > 0 (0 and -0 are not), the same
// bytes at every level, and the two sums within float rounding of float64.
TEST(SketchRotation, SignCodeSetsThePositiveBitsAtEveryLevel) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (uint32_t n : {8u, 64u, 256u}) {
    std::vector<float> y(n);
    for (float& v : y) v = normal(rng);
    y[0] = 0.f;
    y[n - 1] = -0.f;
    y[1] = 1e-30f;
    std::vector<uint8_t> want(n / 8, 0);
    double l1 = 0, sq = 0;
    for (uint32_t i = 0; i < n; ++i) {
      if (y[i] > 0) want[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
      l1 += std::fabs(double(y[i]));
      sq += double(y[i]) * y[i];
    }
    for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2}) {
      if (!SimdLevelSupported(level)) continue;
      SetSimdLevel(level);
      std::vector<uint8_t> code(n / 8, 0xAB);
      float got_l1 = -1, got_sq = -1;
      SignCode(y.data(), n, code.data(), &got_l1, &got_sq);
      EXPECT_EQ(code, want) << SimdLevelName(level) << " n " << n;
      EXPECT_NEAR(got_l1, l1, 1e-5 * l1) << SimdLevelName(level);
      EXPECT_NEAR(got_sq, sq, 1e-5 * sq) << SimdLevelName(level);
      EXPECT_EQ(code[0] & 1, 0);             // y[0] == 0
      EXPECT_EQ(code[0] & 2, 2);             // y[1] > 0
      EXPECT_EQ(code[n / 8 - 1] & 0x80, 0);  // -0
    }
    SetSimdLevel(DetectSimdLevel());
  }
}

// The sketch's estimate of q.e tracks the true value: unbiased over keys (mean error near 0)
// and strongly correlated (about 0.8 for 1-bit codes), for a dim that is and one that is not
// a power of two.
TEST(ResidualSketch, EstimatesTrackTheInnerProduct) {
  for (uint32_t dim : {128u, 80u}) {
    ResidualSketch sk(dim, 3);
    EXPECT_EQ(sk.bits(), 128u);
    std::mt19937 rng(dim);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<float> q(dim), e(dim), scratch(sk.bits());
    for (float& v : q) v = normal(rng);
    ResidualSketch::Query prepared;
    sk.Prepare(q.data(), &prepared, scratch.data());
    double sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
    const int n = 2000;
    std::vector<uint8_t> code(sk.code_bytes());
    for (int i = 0; i < n; ++i) {
      for (float& v : e) v = normal(rng) * (1 + (i % 3));
      const float fac = sk.Encode(e.data(), code.data(), scratch.data());
      int32_t dots = 0;
      SketchDots(prepared.q8.data(), 1, sk.bits(), code.data(), 1, &dots, 1);
      double x = 0;
      for (uint32_t k = 0; k < dim; ++k) x += double(q[k]) * e[k];
      const double y = ResidualSketch::Estimate(prepared, fac, dots);
      sx += x;
      sy += y;
      sxx += x * x;
      syy += y * y;
      sxy += x * y;
    }
    const double cov = sxy / n - (sx / n) * (sy / n);
    const double corr = cov / std::sqrt((sxx / n - sx * sx / n / n) * (syy / n - sy * sy / n / n));
    EXPECT_GT(corr, 0.7) << dim;
    EXPECT_NEAR((sy - sx) / n, 0.0, 0.1 * std::sqrt(sxx / n)) << dim;
  }
  ResidualSketch sk(64, 1);
  std::vector<float> zero(64, 0.f), scratch(64);
  std::vector<uint8_t> code(8, 0xaa);
  EXPECT_EQ(sk.Encode(zero.data(), code.data(), scratch.data()), 0.f);
}

// The 7-bit query's rounding, through the fast-scan tables, against a float64 reference of
// the same sketch (fac * <P q, sign(P e)>): within its bound fac * scale / 2 * D, and small
// against the 1-bit code's own error (RMS below 5% of it), at dims 64 and 128.
TEST(ResidualSketch, SevenBitQueryStaysCloseToTheFloat64Estimate) {
  for (uint32_t dim : {64u, 128u}) {
    ResidualSketch sk(dim, 9);
    const uint32_t D = sk.bits();
    std::mt19937 rng(dim + 1);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<float> q(dim), e(dim), pq(D), scratch(D);
    for (float& v : q) v = normal(rng);
    ResidualSketch::Query prepared;
    sk.Prepare(q.data(), &prepared, scratch.data());
    for (int8_t v : prepared.q8) ASSERT_LE(std::abs(int{v}), ResidualSketch::kQueryMax);
    sk.Rotate(q.data(), pq.data());
    const int n = 500;
    std::vector<uint8_t> codes(uint64_t{n} * sk.code_bytes());
    std::vector<float> facs(n);
    std::vector<double> truth(n);
    for (int i = 0; i < n; ++i) {
      for (float& v : e) v = normal(rng) * (1 + (i % 3));
      facs[i] = sk.Encode(e.data(), codes.data() + uint64_t(i) * sk.code_bytes(), scratch.data());
      double x = 0;
      for (uint32_t k = 0; k < dim; ++k) x += double(q[k]) * e[k];
      truth[i] = x;
    }
    std::vector<uint8_t> packed(PackedSketchBytes(n, D));
    PackSketchCodes(codes.data(), n, D, packed.data());
    std::vector<int32_t> dots(n);
    SketchDotsPacked(prepared.lut.data(), &prepared.lut_bias, 1, D, packed.data(), n, dots.data(),
                     n);
    double q_err2 = 0, bit_err2 = 0;
    for (int i = 0; i < n; ++i) {
      const uint8_t* c = codes.data() + uint64_t(i) * sk.code_bytes();
      double ref = 0;
      for (uint32_t b = 0; b < D; ++b) ref += ((c[b / 8] >> (b % 8)) & 1) ? pq[b] : -pq[b];
      ref *= facs[i];
      const double est = ResidualSketch::Estimate(prepared, facs[i], dots[i]);
      EXPECT_LE(std::fabs(est - ref), facs[i] * prepared.scale / 2 * D * 1.001 + 1e-4) << i;
      q_err2 += (est - ref) * (est - ref);
      bit_err2 += (ref - truth[i]) * (ref - truth[i]);
    }
    EXPECT_LT(std::sqrt(q_err2 / n), 0.05 * std::sqrt(bit_err2 / n)) << dim;
  }
}

// The tail estimate's logits at every level of this CPU: a float64 reference within a few
// ulp, -inf kept for left-out pages, the cap applied, the max returned exactly (it is one of
// the outputs), for lengths around the 8-lane blocks, with and without variances, in place.
TEST(SimdTest, TailLogitsMatchFloat64Reference) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.f, 3.f);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const float scale = 0.125f, half = 0.5f * scale * scale, cap = 2.0f;
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    if (!SimdLevelSupported(level)) continue;
    const SimdLevel saved = SetSimdLevel(level);
    for (uint32_t n : {0u, 1u, 7u, 8u, 9u, 33u, 4096u}) {
      std::vector<float> logs(n), dots(n), vars(n);
      for (uint32_t i = 0; i < n; ++i) {
        logs[i] = i % 5 == 3 ? kNegInf : std::log(static_cast<float>(1 + i % 8));
        dots[i] = normal(rng) * 10;
        vars[i] = i % 7 == 0 ? 1e6f : std::fabs(normal(rng));  // some over the cap
      }
      for (bool with_vars : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << SimdLevelName(level) << " n=" << n << " vars=" << with_vars);
        std::vector<float> out = dots;  // in place
        const float mx = TailLogits(logs.data(), out.data(), with_vars ? vars.data() : nullptr,
                                    scale, half, cap, n, out.data());
        float want_max = kNegInf;
        for (uint32_t i = 0; i < n; ++i) {
          if (logs[i] == kNegInf) {
            EXPECT_EQ(out[i], kNegInf) << i;
            continue;
          }
          double ref = double{logs[i]} + double{scale} * dots[i];
          if (with_vars) ref += std::min(double{half} * vars[i], double{cap});
          EXPECT_NEAR(out[i], ref, 4e-7 * std::max(1.0, std::fabs(ref))) << i;
          want_max = std::max(want_max, out[i]);
        }
        EXPECT_EQ(mx, want_max);
      }
    }
    SetSimdLevel(saved);
  }
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

// Stored statistics saturate instead of overflowing: an infinite variance times a zero query
// component would be NaN in the tail estimate.
TEST(Storage16Saturated, ClampsToTheLargestFiniteValueAndKeepsTheRest) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(FloatToStorage16Saturated(1e6f, true), 0x7bff);      // 65504
  EXPECT_EQ(FloatToStorage16Saturated(65520.0f, true), 0x7bff);  // would round to inf
  EXPECT_EQ(FloatToStorage16Saturated(-1e6f, true), 0xfbff);
  EXPECT_EQ(FloatToStorage16Saturated(kInf, true), 0x7bff);
  EXPECT_EQ(FloatToStorage16Saturated(-kInf, false), 0xff7f);
  EXPECT_EQ(FloatToStorage16Saturated(std::numeric_limits<float>::max(), false), 0x7f7f);
  EXPECT_EQ(FloatToStorage16Saturated(-2.5f, true), FloatToHalf(-2.5f));
  EXPECT_EQ(FloatToStorage16Saturated(1.0f + 1.0f / 256, false), FloatToBf16(1.0f + 1.0f / 256));
  EXPECT_TRUE(std::isnan(Storage16ToFloat(FloatToStorage16Saturated(std::nanf(""), true), true)));
  EXPECT_TRUE(std::isnan(Storage16ToFloat(FloatToStorage16Saturated(std::nanf(""), false), false)));
  EXPECT_EQ(Storage16ToFloat(0x7bff, true), 65504.0f);
  EXPECT_EQ(Storage16ToFloat(0x3f80, false), 1.0f);
}

}  // namespace
}  // namespace icecache::index
