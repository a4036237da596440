#include "server/index/simd.h"

#include <cpuid.h>

// GCC 12's AVX-512 intrinsics pass an undefined register as the unused merge source
// (_mm512_undefined_*), which its -Wmaybe-uninitialized reports inside the header (GCC bug
// 105593, fixed in later releases). Ignored for the header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

namespace icecache::index {

const char* ElemTypeName(ElemType t) {
  switch (t) {
    case ElemType::kF32:
      return "fp32";
    case ElemType::kF16:
      return "fp16";
    case ElemType::kBF16:
      return "bf16";
  }
  return "?";
}

namespace {

// ---------------------------------------------------------------- scalar
inline float LoadScalar(const void* row, ElemType type, uint32_t i) {
  switch (type) {
    case ElemType::kF32:
      return static_cast<const float*>(row)[i];
    case ElemType::kF16:
      return HalfToFloat(static_cast<const uint16_t*>(row)[i]);
    case ElemType::kBF16:
      return Bf16ToFloat(static_cast<const uint16_t*>(row)[i]);
  }
  return 0;
}

float DotScalar(const float* x, const void* row, ElemType type, uint32_t dim) {
  float acc[4] = {0, 0, 0, 0};
  uint32_t i = 0;
  for (; i + 4 <= dim; i += 4) {
    for (int j = 0; j < 4; ++j) acc[j] += x[i + j] * LoadScalar(row, type, i + j);
  }
  for (; i < dim; ++i) acc[0] += x[i] * LoadScalar(row, type, i);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

float SquaredNormScalar(const void* row, ElemType type, uint32_t dim) {
  float acc = 0;
  for (uint32_t i = 0; i < dim; ++i) {
    const float v = LoadScalar(row, type, i);
    acc += v * v;
  }
  return acc;
}

void ToFloatScalar(const void* row, ElemType type, uint32_t dim, float* dst) {
  for (uint32_t i = 0; i < dim; ++i) dst[i] = LoadScalar(row, type, i);
}

void SignedFwhtScalar(const float* x, const float* signs, uint32_t dim, uint32_t n, float scale,
                      float* y) {
  for (uint32_t i = 0; i < dim; ++i) y[i] = x[i] * signs[i];
  for (uint32_t i = dim; i < n; ++i) y[i] = 0.f;
  for (uint32_t h = 1; h < n; h *= 2) {
    for (uint32_t i = 0; i < n; i += 2 * h) {
      for (uint32_t j = i; j < i + h; ++j) {
        const float a = y[j], b = y[j + h];
        y[j] = a + b;
        y[j + h] = a - b;
      }
    }
  }
  for (uint32_t i = 0; i < n; ++i) y[i] *= scale;
}

void SignCodeScalar(const float* y, uint32_t n, uint8_t* code, float* l1, float* sq) {
  float a = 0, b = 0;
  for (uint32_t i = 0; i < n; i += 8) {
    uint8_t byte = 0;
    for (uint32_t j = 0; j < 8; ++j) {
      const float v = y[i + j];
      byte |= static_cast<uint8_t>(v > 0) << j;
      a += std::fabs(v);
      b += v * v;
    }
    code[i / 8] = byte;
  }
  *l1 = a;
  *sq = b;
}

// ---------------------------------------------------------------- AVX2 + FMA + F16C
#define ICECACHE_AVX2 __attribute__((target("avx2,fma,f16c")))

ICECACHE_AVX2 inline __m256 Load8(const void* row, ElemType type, uint32_t i) {
  switch (type) {
    case ElemType::kF32:
      return _mm256_loadu_ps(static_cast<const float*>(row) + i);
    case ElemType::kF16:
      return _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + i)));
    case ElemType::kBF16: {
      const __m128i raw =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
  }
  return _mm256_setzero_ps();
}

ICECACHE_AVX2 inline float HorizontalSum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <ElemType kType>
ICECACHE_AVX2 inline float DotAvx2T(const float* x, const void* row, uint32_t dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  uint32_t i = 0;
  for (; i + 32 <= dim; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), Load8(row, kType, i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), Load8(row, kType, i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), Load8(row, kType, i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), Load8(row, kType, i + 24), a3);
  }
  for (; i + 8 <= dim; i += 8) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), Load8(row, kType, i), a0);
  }
  float tail = 0;
  for (; i < dim; ++i) tail += x[i] * LoadScalar(row, kType, i);
  return HorizontalSum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + tail;
}

ICECACHE_AVX2 float DotAvx2(const float* x, const void* row, ElemType type, uint32_t dim) {
  switch (type) {
    case ElemType::kF32:
      return DotAvx2T<ElemType::kF32>(x, row, dim);
    case ElemType::kF16:
      return DotAvx2T<ElemType::kF16>(x, row, dim);
    case ElemType::kBF16:
      return DotAvx2T<ElemType::kBF16>(x, row, dim);
  }
  return 0;
}

// Butterflies within 8 lanes (h = 1, 2, 4) use the lanes' partner p: the lower element of a
// pair gets y + p (= a + b), the upper p - y (= a - b), as the scalar transform computes them.
ICECACHE_AVX2 void SignedFwhtAvx2(const float* x, const float* signs, uint32_t dim, uint32_t n,
                                  float scale, float* y) {
  uint32_t i = 0;
  for (; i + 8 <= dim; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(signs + i)));
  }
  for (; i < dim; ++i) y[i] = x[i] * signs[i];
  for (; i < n; ++i) y[i] = 0.f;
  for (uint32_t j = 0; j < n; j += 8) {
    __m256 v = _mm256_loadu_ps(y + j);
    __m256 p = _mm256_permute_ps(v, 0xB1);  // pairs swapped
    v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xAA);
    p = _mm256_permute_ps(v, 0x4E);  // 64-bit halves of each 128-bit lane swapped
    v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xCC);
    p = _mm256_permute2f128_ps(v, v, 0x01);  // 128-bit lanes swapped
    v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xF0);
    _mm256_storeu_ps(y + j, v);
  }
  for (uint32_t h = 8; h < n; h *= 2) {
    for (uint32_t b = 0; b < n; b += 2 * h) {
      for (uint32_t j = b; j < b + h; j += 8) {
        const __m256 lo = _mm256_loadu_ps(y + j), hi = _mm256_loadu_ps(y + j + h);
        _mm256_storeu_ps(y + j, _mm256_add_ps(lo, hi));
        _mm256_storeu_ps(y + j + h, _mm256_sub_ps(lo, hi));
      }
    }
  }
  const __m256 s = _mm256_set1_ps(scale);
  for (uint32_t j = 0; j < n; j += 8)
    _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(y + j), s));
}

ICECACHE_AVX2 void SignCodeAvx2(const float* y, uint32_t n, uint8_t* code, float* l1, float* sq) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 a = zero, b = zero;
  for (uint32_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(y + i);
    code[i / 8] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)));
    a = _mm256_add_ps(a, _mm256_and_ps(v, abs_mask));
    b = _mm256_fmadd_ps(v, v, b);
  }
  *l1 = HorizontalSum(a);
  *sq = HorizontalSum(b);
}

// The end of a four-row dot product: out[k] = the 8 lanes of s_k summed, plus row k's scalar
// tail over columns [i, dim). hadd(hadd(s0, s1), hadd(s2, s3)) holds row k's two half-sums in
// lanes k and k + 4, so one add of the two 128-bit halves gives all four sums.
ICECACHE_AVX2 inline void FinishFourRows(__m256 s0, __m256 s1, __m256 s2, __m256 s3, const float* x,
                                         const void* const* row, ElemType type, uint32_t i,
                                         uint32_t dim, float* out) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
  alignas(16) float sums[4];
  _mm_store_ps(sums, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  for (int k = 0; k < 4; ++k) {
    float tail = 0;
    for (uint32_t t = i; t < dim; ++t) tail += x[t] * LoadScalar(row[k], type, t);
    out[k] = sums[k] + tail;
  }
}

// One query against four rows: two accumulator chains per row (eight in all), one joint
// reduction of the four sums. out[k] = x . row_k.
template <ElemType kType>
ICECACHE_AVX2 inline void DotFourRowsAvx2T(const float* x, const void* const* row, uint32_t dim,
                                           float* out) {
  __m256 a[4][2];
  for (auto& ak : a) ak[0] = ak[1] = _mm256_setzero_ps();
  uint32_t i = 0;
  for (; i + 16 <= dim; i += 16) {
    const __m256 q0 = _mm256_loadu_ps(x + i), q1 = _mm256_loadu_ps(x + i + 8);
    for (int k = 0; k < 4; ++k) {
      a[k][0] = _mm256_fmadd_ps(q0, Load8(row[k], kType, i), a[k][0]);
      a[k][1] = _mm256_fmadd_ps(q1, Load8(row[k], kType, i + 8), a[k][1]);
    }
  }
  for (; i + 8 <= dim; i += 8) {
    const __m256 q = _mm256_loadu_ps(x + i);
    for (int k = 0; k < 4; ++k) a[k][0] = _mm256_fmadd_ps(q, Load8(row[k], kType, i), a[k][0]);
  }
  FinishFourRows(_mm256_add_ps(a[0][0], a[0][1]), _mm256_add_ps(a[1][0], a[1][1]),
                 _mm256_add_ps(a[2][0], a[2][1]), _mm256_add_ps(a[3][0], a[3][1]), x, row, kType, i,
                 dim, out);
}

template <ElemType kType>
ICECACHE_AVX2 void DotStridedAvx2T(const float* x, const uint8_t* base, uint64_t stride, uint32_t n,
                                   uint32_t dim, float* out) {
  uint32_t r = 0;
  for (; r + 4 <= n; r += 4) {
    const void* four[4] = {base + r * stride, base + (r + 1) * stride, base + (r + 2) * stride,
                           base + (r + 3) * stride};
    DotFourRowsAvx2T<kType>(x, four, dim, out + r);
  }
  for (; r < n; ++r) out[r] = DotAvx2T<kType>(x, base + r * stride, dim);
}

ICECACHE_AVX2 void DotStridedAvx2(const float* x, const void* base, uint64_t stride, uint32_t n,
                                  ElemType type, uint32_t dim, float* out) {
  const uint8_t* b = static_cast<const uint8_t*>(base);
  switch (type) {
    case ElemType::kF32:
      return DotStridedAvx2T<ElemType::kF32>(x, b, stride, n, dim, out);
    case ElemType::kF16:
      return DotStridedAvx2T<ElemType::kF16>(x, b, stride, n, dim, out);
    case ElemType::kBF16:
      return DotStridedAvx2T<ElemType::kBF16>(x, b, stride, n, dim, out);
  }
}

template <ElemType kType>
ICECACHE_AVX2 void DotGatherAvx2T(const float* x, const void* const* rows, uint32_t n, uint32_t dim,
                                  float* out) {
  uint32_t r = 0;
  for (; r + 4 <= n; r += 4) {
    for (uint32_t k = r + 4; k < std::min(n, r + 8); ++k) {
      _mm_prefetch(static_cast<const char*>(rows[k]), _MM_HINT_T0);
    }
    DotFourRowsAvx2T<kType>(x, rows + r, dim, out + r);
  }
  for (; r < n; ++r) {
    if (r + 2 < n) _mm_prefetch(static_cast<const char*>(rows[r + 2]), _MM_HINT_T0);
    out[r] = DotAvx2T<kType>(x, rows[r], dim);
  }
}

ICECACHE_AVX2 void DotGatherAvx2(const float* x, const void* const* rows, uint32_t n, ElemType type,
                                 uint32_t dim, float* out) {
  switch (type) {
    case ElemType::kF32:
      return DotGatherAvx2T<ElemType::kF32>(x, rows, n, dim, out);
    case ElemType::kF16:
      return DotGatherAvx2T<ElemType::kF16>(x, rows, n, dim, out);
    case ElemType::kBF16:
      return DotGatherAvx2T<ElemType::kBF16>(x, rows, n, dim, out);
  }
}

// NQ (1..8, a compile-time constant so the accumulators stay in registers) queries against
// one row: the row is converted once per 8 elements.
template <ElemType kType, int NQ>
ICECACHE_AVX2 inline void DotRowMultiAvx2T(const float* xs, const void* row, uint32_t dim,
                                           float* out, uint32_t out_stride) {
  __m256 acc[NQ];
  for (int j = 0; j < NQ; ++j) acc[j] = _mm256_setzero_ps();
  uint32_t i = 0;
  for (; i + 8 <= dim; i += 8) {
    const __m256 r = Load8(row, kType, i);
    for (int j = 0; j < NQ; ++j) {
      acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + uint64_t(j) * dim + i), r, acc[j]);
    }
  }
  for (int j = 0; j < NQ; ++j) {
    float tail = 0;
    for (uint32_t t = i; t < dim; ++t)
      tail += xs[uint64_t(j) * dim + t] * LoadScalar(row, kType, t);
    out[uint64_t(j) * out_stride] = HorizontalSum(acc[j]) + tail;
  }
}

template <ElemType kType, int NQ>
ICECACHE_AVX2 void DotRowsMultiAvx2T(const float* xs, const uint8_t* base, uint64_t stride,
                                     const void* const* rows, uint32_t n, uint32_t dim, float* out,
                                     uint32_t out_stride) {
  for (uint32_t r = 0; r < n; ++r) {
    const void* row = rows != nullptr ? rows[r] : base + r * stride;
    if (rows != nullptr && r + 2 < n) {
      _mm_prefetch(static_cast<const char*>(rows[r + 2]), _MM_HINT_T0);
    }
    DotRowMultiAvx2T<kType, NQ>(xs, row, dim, out + r, out_stride);
  }
}

template <ElemType kType>
ICECACHE_AVX2 void DotMultiAvx2T(const float* xs, uint32_t nq, const uint8_t* base, uint64_t stride,
                                 const void* const* rows, uint32_t n, uint32_t dim, float* out,
                                 uint32_t out_stride) {
  for (uint32_t q0 = 0; q0 < nq; q0 += 8) {
    const uint32_t m = std::min<uint32_t>(8, nq - q0);
    const float* x = xs + uint64_t{q0} * dim;
    float* o = out + uint64_t{q0} * out_stride;
    switch (m) {
#define ICECACHE_NQ_CASE(k)                                                    \
  case k:                                                                      \
    DotRowsMultiAvx2T<kType, k>(x, base, stride, rows, n, dim, o, out_stride); \
    break;
      ICECACHE_NQ_CASE(1)
      ICECACHE_NQ_CASE(2)
      ICECACHE_NQ_CASE(3)
      ICECACHE_NQ_CASE(4)
      ICECACHE_NQ_CASE(5)
      ICECACHE_NQ_CASE(6)
      ICECACHE_NQ_CASE(7)
      ICECACHE_NQ_CASE(8)
#undef ICECACHE_NQ_CASE
    }
  }
}

ICECACHE_AVX2 void DotMultiAvx2(const float* xs, uint32_t nq, const void* base, uint64_t stride,
                                const void* const* rows, uint32_t n, ElemType type, uint32_t dim,
                                float* out, uint32_t out_stride) {
  const uint8_t* b = static_cast<const uint8_t*>(base);
  switch (type) {
    case ElemType::kF32:
      return DotMultiAvx2T<ElemType::kF32>(xs, nq, b, stride, rows, n, dim, out, out_stride);
    case ElemType::kF16:
      return DotMultiAvx2T<ElemType::kF16>(xs, nq, b, stride, rows, n, dim, out, out_stride);
    case ElemType::kBF16:
      return DotMultiAvx2T<ElemType::kBF16>(xs, nq, b, stride, rows, n, dim, out, out_stride);
  }
}

// NQ (1..4) weight vectors over the rows, 16 output columns at a time: 2 * NQ accumulators,
// per row two loads (converted once), NQ broadcasts and 2 * NQ FMAs. Each pass over the rows
// reads one 64-byte run of each (fp32), so every row byte is read once over all passes.
template <ElemType kType, int NQ>
ICECACHE_AVX2 void WeightedSumAvx2T(const float* weights, uint64_t w_stride, const uint8_t* base,
                                    uint64_t stride, uint32_t n, uint32_t dim, float* out) {
  uint32_t c = 0;
  for (; c + 16 <= dim; c += 16) {
    __m256 acc[NQ][2];
    for (int j = 0; j < NQ; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (uint32_t i = 0; i < n; ++i) {
      const uint8_t* row = base + i * stride;
      const __m256 r0 = Load8(row, kType, c), r1 = Load8(row, kType, c + 8);
      for (int j = 0; j < NQ; ++j) {
        const __m256 w = _mm256_broadcast_ss(weights + j * w_stride + i);
        acc[j][0] = _mm256_fmadd_ps(w, r0, acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(w, r1, acc[j][1]);
      }
    }
    for (int j = 0; j < NQ; ++j) {
      float* o = out + uint64_t(j) * dim + c;
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[j][0]));
      _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), acc[j][1]));
    }
  }
  for (; c + 8 <= dim; c += 8) {
    __m256 acc[NQ];
    for (int j = 0; j < NQ; ++j) acc[j] = _mm256_setzero_ps();
    for (uint32_t i = 0; i < n; ++i) {
      const __m256 r = Load8(base + i * stride, kType, c);
      for (int j = 0; j < NQ; ++j) {
        acc[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + j * w_stride + i), r, acc[j]);
      }
    }
    for (int j = 0; j < NQ; ++j) {
      float* o = out + uint64_t(j) * dim + c;
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[j]));
    }
  }
  for (; c < dim; ++c) {
    for (int j = 0; j < NQ; ++j) {
      float a = 0;
      for (uint32_t i = 0; i < n; ++i) {
        a += weights[j * w_stride + i] * LoadScalar(base + i * stride, kType, c);
      }
      out[uint64_t(j) * dim + c] += a;
    }
  }
}

template <ElemType kType>
ICECACHE_AVX2 void WeightedSumAvx2Q(const float* weights, uint32_t nq, uint64_t w_stride,
                                    const uint8_t* base, uint64_t stride, uint32_t n, uint32_t dim,
                                    float* out) {
  for (uint32_t q0 = 0; q0 < nq; q0 += 4) {
    const float* w = weights + q0 * w_stride;
    float* o = out + uint64_t{q0} * dim;
    switch (std::min<uint32_t>(4, nq - q0)) {
      case 1:
        WeightedSumAvx2T<kType, 1>(w, w_stride, base, stride, n, dim, o);
        break;
      case 2:
        WeightedSumAvx2T<kType, 2>(w, w_stride, base, stride, n, dim, o);
        break;
      case 3:
        WeightedSumAvx2T<kType, 3>(w, w_stride, base, stride, n, dim, o);
        break;
      default:
        WeightedSumAvx2T<kType, 4>(w, w_stride, base, stride, n, dim, o);
        break;
    }
  }
}

ICECACHE_AVX2 void WeightedSumAvx2(const float* weights, uint32_t nq, uint64_t w_stride,
                                   const void* base, uint64_t stride, uint32_t n, ElemType type,
                                   uint32_t dim, float* out) {
  const uint8_t* b = static_cast<const uint8_t*>(base);
  switch (type) {
    case ElemType::kF32:
      return WeightedSumAvx2Q<ElemType::kF32>(weights, nq, w_stride, b, stride, n, dim, out);
    case ElemType::kF16:
      return WeightedSumAvx2Q<ElemType::kF16>(weights, nq, w_stride, b, stride, n, dim, out);
    case ElemType::kBF16:
      return WeightedSumAvx2Q<ElemType::kBF16>(weights, nq, w_stride, b, stride, n, dim, out);
  }
}

// 4 children x 16 parents per register tile: 8 accumulators, per element two parent loads,
// four broadcasts and eight FMAs (no horizontal sums).
ICECACHE_AVX2 void BestLiftedParentsAvx2(const float* children, uint32_t nc,
                                         const float* child_lift, const float* parents_t,
                                         const float* parent_lift, uint32_t np, uint32_t np_pad,
                                         uint32_t dim, float* best_v, uint32_t* best_j) {
  alignas(32) float tile[4][16];
  for (uint32_t c0 = 0; c0 < nc; c0 += 4) {
    const uint32_t rows = std::min<uint32_t>(4, nc - c0);
    const float* x[4];
    for (uint32_t r = 0; r < 4; ++r) x[r] = children + uint64_t{c0 + std::min(r, rows - 1)} * dim;
    for (uint32_t j0 = 0; j0 < np; j0 += 16) {
      __m256 acc[4][2];
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      const float* pt = parents_t + j0;
      for (uint32_t i = 0; i < dim; ++i) {
        const __m256 p0 = _mm256_loadu_ps(pt + uint64_t{i} * np_pad);
        const __m256 p1 = _mm256_loadu_ps(pt + uint64_t{i} * np_pad + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 xv = _mm256_broadcast_ss(x[r] + i);
          acc[r][0] = _mm256_fmadd_ps(xv, p0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(xv, p1, acc[r][1]);
        }
      }
      const __m256 b0 = _mm256_loadu_ps(parent_lift + j0);
      const __m256 b1 = _mm256_loadu_ps(parent_lift + j0 + 8);
      for (uint32_t r = 0; r < rows; ++r) {
        const __m256 a = _mm256_set1_ps(child_lift[c0 + r]);
        _mm256_store_ps(tile[r], _mm256_fmadd_ps(a, b0, acc[r][0]));
        _mm256_store_ps(tile[r] + 8, _mm256_fmadd_ps(a, b1, acc[r][1]));
        const uint32_t lim = std::min<uint32_t>(16, np - j0);
        for (uint32_t t = 0; t < lim; ++t) {
          if (tile[r][t] > best_v[c0 + r]) {
            best_v[c0 + r] = tile[r][t];
            best_j[c0 + r] = j0 + t;
          }
        }
      }
    }
  }
}

// TailLogits over [begin, n), the running max starting at m.
inline float TailLogitsScalar(const float* logs, const float* dots, const float* vars, float scale,
                              float half_scale_sq, float cap, uint32_t begin, uint32_t n, float m,
                              float* out) {
  for (uint32_t i = begin; i < n; ++i) {
    float s = logs[i] + scale * dots[i];
    if (vars != nullptr) s += std::min(half_scale_sq * vars[i], cap);
    out[i] = s;
    m = std::max(m, s);
  }
  return m;
}

ICECACHE_AVX2 float TailLogitsAvx2(const float* logs, const float* dots, const float* vars,
                                   float scale, float half_scale_sq, float cap, uint32_t n,
                                   float* out) {
  const __m256 vs = _mm256_set1_ps(scale), vh = _mm256_set1_ps(half_scale_sq);
  const __m256 vc = _mm256_set1_ps(cap);
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 s = _mm256_fmadd_ps(vs, _mm256_loadu_ps(dots + i), _mm256_loadu_ps(logs + i));
    if (vars != nullptr) {
      s = _mm256_add_ps(s, _mm256_min_ps(_mm256_mul_ps(vh, _mm256_loadu_ps(vars + i)), vc));
    }
    _mm256_storeu_ps(out + i, s);
    mx = _mm256_max_ps(mx, s);
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  return TailLogitsScalar(logs, dots, vars, scale, half_scale_sq, cap, i, n, _mm_cvtss_f32(m4),
                          out);
}

// exp(x) = 2^n * 2^f with n = round(x log2 e), f in [-0.5, 0.5]; 2^f by a degree-6
// polynomial (Taylor of e^(f ln 2), error < 2e-7 on the interval).
ICECACHE_AVX2 void ExpAvx2(float* x, uint32_t n) {
  const __m256 log2e = _mm256_set1_ps(1.4426950408889634f);
  const __m256 ln2 = _mm256_set1_ps(0.6931471805599453f);
  const __m256 lo = _mm256_set1_ps(-87.0f), hi = _mm256_set1_ps(88.0f);
  const __m256 c1 = _mm256_set1_ps(1.0f), c2 = _mm256_set1_ps(1.0f / 2),
               c3 = _mm256_set1_ps(1.0f / 6);
  const __m256 c4 = _mm256_set1_ps(1.0f / 24), c5 = _mm256_set1_ps(1.0f / 120);
  const __m256 c6 = _mm256_set1_ps(1.0f / 720);
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 under = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
    const __m256 c = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    const __m256 k =
        _mm256_round_ps(_mm256_mul_ps(c, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r =
        _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(c, log2e), k), ln2);  // r in [-ln2/2, ln2/2]
    __m256 p = _mm256_fmadd_ps(c6, r, c5);
    p = _mm256_fmadd_ps(p, r, c4);
    p = _mm256_fmadd_ps(p, r, c3);
    p = _mm256_fmadd_ps(p, r, c2);
    p = _mm256_fmadd_ps(p, r, c1);
    p = _mm256_fmadd_ps(p, r, c1);
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    const __m256 out = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    _mm256_storeu_ps(x + i, _mm256_andnot_ps(under, out));
  }
  for (; i < n; ++i) x[i] = x[i] < -87.f ? 0.f : std::exp(x[i]);
}

ICECACHE_AVX2 float SquaredNormAvx2(const void* row, ElemType type, uint32_t dim) {
  __m256 acc = _mm256_setzero_ps();
  uint32_t i = 0;
  for (; i + 8 <= dim; i += 8) {
    const __m256 v = Load8(row, type, i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float tail = 0;
  for (; i < dim; ++i) {
    const float v = LoadScalar(row, type, i);
    tail += v * v;
  }
  return HorizontalSum(acc) + tail;
}

ICECACHE_AVX2 void ToFloatAvx2(const void* row, ElemType type, uint32_t dim, float* dst) {
  uint32_t i = 0;
  for (; i + 8 <= dim; i += 8) _mm256_storeu_ps(dst + i, Load8(row, type, i));
  for (; i < dim; ++i) dst[i] = LoadScalar(row, type, i);
}

// ---------------------------------------------------------------- sketch dots
// Scalar reference: exact integer sums.
void SketchDotsScalar(const int8_t* q8, uint32_t nq, uint32_t bits, const uint8_t* codes,
                      uint32_t n, int32_t* out, uint32_t out_stride) {
  const uint32_t bytes = bits / 8;
  for (uint32_t i = 0; i < n; ++i) {
    const uint8_t* c = codes + uint64_t{i} * bytes;
    for (uint32_t j = 0; j < nq; ++j) {
      const int8_t* q = q8 + uint64_t{j} * bits;
      int32_t acc = 0;
      for (uint32_t b = 0; b < bits; ++b) {
        if ((c[b / 8] >> (b % 8)) & 1) acc += q[b];
      }
      out[uint64_t{j} * out_stride + i] = acc;
    }
  }
}

// AVX2: 32 bits of a code become 32 bytes of 0/1 (byte m of the word is replicated over 8
// bytes, each tested against its bit); u8 x s8 products summed in pairs (maddubs: at most
// 2 * 127, no saturation), then in fours (madd with ones) into 8 int32 lanes.
ICECACHE_AVX2 inline __m256i ExpandBits32Avx2(uint32_t w) {
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2,
                                        2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(w)), shuf);
  v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
  return _mm256_and_si256(v, _mm256_set1_epi8(1));
}

ICECACHE_AVX2 inline int32_t HorizontalSumEpi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Sums of 8 vectors' lanes, one per output lane: out[t] = sum of the lanes of v[t].
ICECACHE_AVX2 inline __m256i SumLanes8(const __m256i* v) {
  const __m256i h01 = _mm256_hadd_epi32(v[0], v[1]), h23 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i h45 = _mm256_hadd_epi32(v[4], v[5]), h67 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                          _mm256_permute2x128_si256(a, b, 0x31));
}

// Tokens in groups of 8: per token and query the pair sums accumulate in int16 (at most
// bits / 32 * 2 * 128 in magnitude: the caller keeps bits <= 2048), widen once to int32, and
// 8 tokens' lanes are summed together (SumLanes8) instead of one horizontal sum each.
template <int NQ>
ICECACHE_AVX2 void SketchDotsAvx2T(const int8_t* q8, uint32_t bits, const uint8_t* codes,
                                   uint32_t n, int32_t* out, uint32_t out_stride) {
  const uint32_t bytes = bits / 8;
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i lanes[NQ][8];
  alignas(32) int32_t tail[8];
  for (uint32_t i0 = 0; i0 < n; i0 += 8) {
    const uint32_t m = std::min<uint32_t>(8, n - i0);
    for (uint32_t t = 0; t < 8; ++t) {
      if (t >= m) {
        for (int j = 0; j < NQ; ++j) lanes[j][t] = _mm256_setzero_si256();
        continue;
      }
      const uint8_t* c = codes + uint64_t{i0 + t} * bytes;
      __m256i acc[NQ];
      for (int j = 0; j < NQ; ++j) acc[j] = _mm256_setzero_si256();
      for (uint32_t b = 0; b < bits; b += 32) {
        uint32_t w;
        std::memcpy(&w, c + b / 8, 4);
        const __m256i a = ExpandBits32Avx2(w);
        for (int j = 0; j < NQ; ++j) {
          const __m256i q =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + uint64_t(j) * bits + b));
          acc[j] = _mm256_add_epi16(acc[j], _mm256_maddubs_epi16(a, q));
        }
      }
      for (int j = 0; j < NQ; ++j) lanes[j][t] = _mm256_madd_epi16(acc[j], ones16);
    }
    for (int j = 0; j < NQ; ++j) {
      const __m256i sums = SumLanes8(lanes[j]);
      int32_t* o = out + uint64_t(j) * out_stride + i0;
      if (m == 8) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), sums);
      } else {
        _mm256_store_si256(reinterpret_cast<__m256i*>(tail), sums);
        std::copy_n(tail, m, o);
      }
    }
  }
}

// ---------------------------------------------------------------- fast-scan sketch dots
// Scalar reference over the packed layout (simd.h): per key, the sum of its groups' table
// entries plus the bias.
void SketchDotsPackedScalar(const uint8_t* luts, const int32_t* bias, uint32_t nq, uint32_t bits,
                            const uint8_t* packed, uint32_t n, int32_t* out, uint32_t out_stride) {
  const uint32_t bytes = bits / 8;
  for (uint32_t i = 0; i < n; ++i) {
    const uint8_t* blk = packed + uint64_t{i / kSketchBlockKeys} * bits * 2;
    const uint32_t j = i % kSketchBlockKeys;
    for (uint32_t q = 0; q < nq; ++q) {
      const uint8_t* lut = luts + uint64_t{q} * bits * 4;
      int32_t acc = bias[q];
      for (uint32_t p = 0; p < bytes; ++p) {
        const uint8_t c = blk[p * kSketchBlockKeys + j];
        acc += lut[SketchLutOffset(2 * p) + (c & 15u)] + lut[SketchLutOffset(2 * p + 1) + (c >> 4)];
      }
      out[uint64_t{q} * out_stride + i] = acc;
    }
  }
}

// AVX2 fast scan, 16 keys per block, NQ <= 4 queries. Per pair of code bytes (p, p + 1): one
// 32-byte load holds both bytes of the 16 keys (one per lane); its low nibbles index the
// tables of groups 2p | 2p + 2 and its high nibbles those of 2p + 1 | 2p + 3, one pshufb each.
// The uint8 entries accumulate in uint16 lanes, FAISS's way: the result added as 16-bit words
// (even byte + 256 * odd byte, modulo 2^16) and shifted right by 8 (the odd bytes); the even
// sums are recovered at the end as words - (odd << 8). Per key the sum is at most
// bits / 4 * 252, within uint16 for bits <= 1024.
template <int NQ>
ICECACHE_AVX2 void SketchDotsPackedAvx2T(const uint8_t* luts, const int32_t* bias, uint32_t bits,
                                         const uint8_t* packed, uint32_t n, int32_t* out,
                                         uint32_t out_stride) {
  const uint32_t pairs = bits / 16;
  const uint64_t lut_stride = uint64_t{bits} * 4;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  alignas(32) int32_t tail[16];
  for (uint32_t i0 = 0; i0 < n; i0 += kSketchBlockKeys) {
    const uint8_t* blk = packed + uint64_t{i0 / kSketchBlockKeys} * bits * 2;
    __m256i w[NQ], odd[NQ];
    for (int j = 0; j < NQ; ++j) w[j] = odd[j] = _mm256_setzero_si256();
    for (uint32_t m = 0; m < pairs; ++m) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + m * 32));
      const __m256i lo = _mm256_and_si256(c, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low4);
      for (int j = 0; j < NQ; ++j) {
        const uint8_t* t = luts + j * lut_stride + m * 64;
        const __m256i rl =
            _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)), lo);
        const __m256i rh =
            _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32)), hi);
        w[j] = _mm256_add_epi16(w[j], _mm256_add_epi16(rl, rh));
        odd[j] = _mm256_add_epi16(
            odd[j], _mm256_add_epi16(_mm256_srli_epi16(rl, 8), _mm256_srli_epi16(rh, 8)));
      }
    }
    const uint32_t cnt = std::min<uint32_t>(kSketchBlockKeys, n - i0);
    for (int j = 0; j < NQ; ++j) {
      int32_t* o = out + uint64_t(j) * out_stride + i0;
      int32_t* dst = cnt == kSketchBlockKeys ? o : tail;
      const __m256i even = _mm256_sub_epi16(w[j], _mm256_slli_epi16(odd[j], 8));
      // The two lanes (different groups of the same keys), summed.
      const __m128i ev =
          _mm_add_epi16(_mm256_castsi256_si128(even), _mm256_extracti128_si256(even, 1));
      const __m128i od =
          _mm_add_epi16(_mm256_castsi256_si128(odd[j]), _mm256_extracti128_si256(odd[j], 1));
      const __m256i b = _mm256_set1_epi32(bias[j]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                          _mm256_add_epi32(_mm256_cvtepu16_epi32(_mm_unpacklo_epi16(ev, od)), b));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 8),
                          _mm256_add_epi32(_mm256_cvtepu16_epi32(_mm_unpackhi_epi16(ev, od)), b));
      if (cnt < kSketchBlockKeys) std::copy_n(tail, cnt, o);
    }
  }
}

// Estimates 8 keys at a time (F16C factors), compare with the floor, and a movemask that
// skips the 8 when none beats it (most of them, once a query's candidates have a floor).
ICECACHE_AVX2 uint32_t SketchCandidatesAboveAvx2(const int32_t* dots, const uint16_t* fac,
                                                 const uint32_t* tok, uint32_t n, float base,
                                                 float scale, int32_t sum, float floor,
                                                 uint64_t* out) {
  const __m256 vb = _mm256_set1_ps(base), vs = _mm256_set1_ps(scale), vf = _mm256_set1_ps(floor);
  const __m256i vsum = _mm256_set1_epi32(sum);
  alignas(32) float e8[8];
  uint32_t m = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dots + i));
    const __m256 t = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_add_epi32(d, d), vsum));
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(fac + i)));
    const __m256 e = _mm256_add_ps(vb, _mm256_mul_ps(_mm256_mul_ps(f, vs), t));
    uint32_t mask = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(e, vf, _CMP_GT_OQ)));
    if (mask == 0) continue;
    _mm256_store_ps(e8, e);
    while (mask) {
      const uint32_t b = static_cast<uint32_t>(__builtin_ctz(mask));
      out[m++] = RankKey(e8[b], tok[i + b]);
      mask &= mask - 1;
    }
  }
  for (; i < n; ++i) {
    const float e = base + (HalfToFloat(fac[i]) * scale) * static_cast<float>(2 * dots[i] - sum);
    if (e > floor) out[m++] = RankKey(e, tok[i]);
  }
  return m;
}

// AVX-VNNI: the same with the VEX dot product (u8 x s8 summed in fours into int32).
#define ICECACHE_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))

ICECACHE_AVXVNNI inline __m256i ExpandBits32AvxVnni(uint32_t w) {
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2,
                                        2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(w)), shuf);
  v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
  return _mm256_and_si256(v, _mm256_set1_epi8(1));
}

ICECACHE_AVXVNNI inline int32_t HorizontalSumEpi32AvxVnni(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

template <int NQ>
ICECACHE_AVXVNNI void SketchDotsAvxVnniT(const int8_t* q8, uint32_t bits, const uint8_t* codes,
                                         uint32_t n, int32_t* out, uint32_t out_stride) {
  const uint32_t bytes = bits / 8;
  for (uint32_t i = 0; i < n; ++i) {
    const uint8_t* c = codes + uint64_t{i} * bytes;
    __m256i acc[NQ];
    for (int j = 0; j < NQ; ++j) acc[j] = _mm256_setzero_si256();
    for (uint32_t b = 0; b < bits; b += 32) {
      uint32_t w;
      std::memcpy(&w, c + b / 8, 4);
      const __m256i a = ExpandBits32AvxVnni(w);
      for (int j = 0; j < NQ; ++j) {
        const __m256i q =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + uint64_t(j) * bits + b));
        acc[j] = _mm256_dpbusd_avx_epi32(acc[j], a, q);
      }
    }
    for (int j = 0; j < NQ; ++j) {
      out[uint64_t(j) * out_stride + i] = HorizontalSumEpi32AvxVnni(acc[j]);
    }
  }
}

#define ICECACHE_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#define ICECACHE_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))

// Lane sums of a zmm register through memory: GCC 12's AVX-512 reduction and 512->256 cast
// intrinsics read an undefined register inside the header, which -Werror rejects.
ICECACHE_AVX512 inline int32_t ReduceAddEpi32Avx512(__m512i v) {
  alignas(64) int32_t t[16];
  _mm512_store_si512(t, v);
  const __m256i s = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(t)),
                                     _mm256_load_si256(reinterpret_cast<const __m256i*>(t + 8)));
  return HorizontalSumEpi32(s);
}

ICECACHE_AVX512 inline float ReduceAddPsAvx512(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  return HorizontalSum(_mm256_add_ps(_mm256_load_ps(t), _mm256_load_ps(t + 8)));
}

// AVX-512 (F+BW): 64 bits of a code become 64 bytes of 0/1 through a byte mask; maddubs and
// madd as on AVX2, 16 int32 lanes.
template <int NQ>
ICECACHE_AVX512 void SketchDotsAvx512T(const int8_t* q8, uint32_t bits, const uint8_t* codes,
                                       uint32_t n, int32_t* out, uint32_t out_stride) {
  const uint32_t bytes = bits / 8;
  const __m512i ones8 = _mm512_set1_epi8(1);
  const __m512i ones16 = _mm512_set1_epi16(1);
  for (uint32_t i = 0; i < n; ++i) {
    const uint8_t* c = codes + uint64_t{i} * bytes;
    __m512i acc[NQ];
    for (int j = 0; j < NQ; ++j) acc[j] = _mm512_setzero_si512();
    for (uint32_t b = 0; b < bits; b += 64) {
      uint64_t w;
      std::memcpy(&w, c + b / 8, 8);
      const __m512i a = _mm512_maskz_mov_epi8(static_cast<__mmask64>(w), ones8);
      for (int j = 0; j < NQ; ++j) {
        const __m512i q = _mm512_loadu_si512(q8 + uint64_t(j) * bits + b);
        acc[j] = _mm512_add_epi32(acc[j], _mm512_madd_epi16(_mm512_maddubs_epi16(a, q), ones16));
      }
    }
    for (int j = 0; j < NQ; ++j) out[uint64_t(j) * out_stride + i] = ReduceAddEpi32Avx512(acc[j]);
  }
}

// AVX-512 VNNI: the same with vpdpbusd.
template <int NQ>
ICECACHE_AVX512VNNI void SketchDotsAvx512VnniT(const int8_t* q8, uint32_t bits,
                                               const uint8_t* codes, uint32_t n, int32_t* out,
                                               uint32_t out_stride) {
  const uint32_t bytes = bits / 8;
  const __m512i ones8 = _mm512_set1_epi8(1);
  for (uint32_t i = 0; i < n; ++i) {
    const uint8_t* c = codes + uint64_t{i} * bytes;
    __m512i acc[NQ];
    for (int j = 0; j < NQ; ++j) acc[j] = _mm512_setzero_si512();
    for (uint32_t b = 0; b < bits; b += 64) {
      uint64_t w;
      std::memcpy(&w, c + b / 8, 8);
      const __m512i a = _mm512_maskz_mov_epi8(static_cast<__mmask64>(w), ones8);
      for (int j = 0; j < NQ; ++j) {
        const __m512i q = _mm512_loadu_si512(q8 + uint64_t(j) * bits + b);
        acc[j] = _mm512_dpbusd_epi32(acc[j], a, q);
      }
    }
    for (int j = 0; j < NQ; ++j) out[uint64_t(j) * out_stride + i] = ReduceAddEpi32Avx512(acc[j]);
  }
}

// The candidate keys of 16 estimates e and their tokens, those selected by mask written to
// out[0, popcount(mask)) in lane order and nothing past them; returns the count. Each half of
// 8 keys is compressed in a register, then stored masked to its count: the compress with a
// memory destination (vpcompress m512{k}) costs about 27 ns a store on AMD Zen 4
// (bench/experiments/compress_store.cc on that VM: 1.76 against 0.15 ns per key with half
// the keys above, 0.59 against 0.12 with 2%; Intel runs both forms alike).
ICECACHE_AVX512 inline uint32_t StoreCandidatesAvx512(uint64_t* out, __mmask16 mask, __m512 e,
                                                      __m512i tok) {
  // OrderedFloatBits, 16 lanes: -0 to +0, then ~b for negatives and b | sign for the others.
  const __m512i b = _mm512_castps_si512(_mm512_add_ps(e, _mm512_setzero_ps()));
  const __m512i ord = _mm512_xor_si512(
      b,
      _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
  const __m512i ntok = _mm512_xor_si512(tok, _mm512_set1_epi32(-1));
  uint32_t m = 0;
  for (int half = 0; half < 2; ++half) {
    const __mmask8 k = static_cast<__mmask8>(mask >> (8 * half));
    if (k == 0) continue;
    const __m256i hi = half == 0 ? _mm512_castsi512_si256(ord) : _mm512_extracti64x4_epi64(ord, 1);
    const __m256i lo =
        half == 0 ? _mm512_castsi512_si256(ntok) : _mm512_extracti64x4_epi64(ntok, 1);
    const __m512i key = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(hi), 32),
                                        _mm512_cvtepu32_epi64(lo));
    const uint32_t c = static_cast<uint32_t>(__builtin_popcount(k));
    _mm512_mask_storeu_epi64(out + m, static_cast<__mmask8>((1u << c) - 1u),
                             _mm512_maskz_compress_epi64(k, key));
    m += c;
  }
  return m;
}

// The estimates 16 keys at a time, the candidates among them written as keys.
ICECACHE_AVX512 uint32_t SketchCandidatesAboveAvx512(const int32_t* dots, const uint16_t* fac,
                                                     const uint32_t* tok, uint32_t n, float base,
                                                     float scale, int32_t sum, float floor,
                                                     uint64_t* out) {
  const __m512 vb = _mm512_set1_ps(base), vs = _mm512_set1_ps(scale), vf = _mm512_set1_ps(floor);
  const __m512i vsum = _mm512_set1_epi32(sum);
  uint32_t m = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i d = _mm512_loadu_si512(dots + i);
    const __m512 t = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(d, d), vsum));
    const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(fac + i)));
    const __m512 e = _mm512_add_ps(vb, _mm512_mul_ps(_mm512_mul_ps(f, vs), t));
    const __mmask16 mask = _mm512_cmp_ps_mask(e, vf, _CMP_GT_OQ);
    if (mask != 0) m += StoreCandidatesAvx512(out + m, mask, e, _mm512_loadu_si512(tok + i));
  }
  // The last 1-15 keys with masked loads (the masked-off lanes are not read, so nothing past n
  // is touched); the same arithmetic as the full blocks.
  if (i < n) {
    const uint32_t r = n - i;
    const __mmask16 live = static_cast<__mmask16>((1u << r) - 1u);
    const __m512i d = _mm512_maskz_loadu_epi32(live, dots + i);
    const __m512 t = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(d, d), vsum));
    const __m512 f = _mm512_cvtph_ps(
        _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(static_cast<__mmask32>(live), fac + i)));
    const __m512 e = _mm512_add_ps(vb, _mm512_mul_ps(_mm512_mul_ps(f, vs), t));
    const __mmask16 mask = _mm512_mask_cmp_ps_mask(live, e, vf, _CMP_GT_OQ);
    if (mask != 0) {
      m += StoreCandidatesAvx512(out + m, mask, e, _mm512_maskz_loadu_epi32(live, tok + i));
    }
  }
  return m;
}

// Runs kernel K<NQ> over the queries in chunks of at most 4 (accumulators stay in registers).
template <template <int> class K>
void SketchDotsChunked(const int8_t* q8, uint32_t nq, uint32_t bits, const uint8_t* codes,
                       uint32_t n, int32_t* out, uint32_t out_stride) {
  for (uint32_t q0 = 0; q0 < nq; q0 += 4) {
    const uint32_t m = std::min<uint32_t>(4, nq - q0);
    const int8_t* q = q8 + uint64_t{q0} * bits;
    int32_t* o = out + uint64_t{q0} * out_stride;
    switch (m) {
      case 1:
        K<1>::Run(q, bits, codes, n, o, out_stride);
        break;
      case 2:
        K<2>::Run(q, bits, codes, n, o, out_stride);
        break;
      case 3:
        K<3>::Run(q, bits, codes, n, o, out_stride);
        break;
      default:
        K<4>::Run(q, bits, codes, n, o, out_stride);
        break;
    }
  }
}

template <int NQ>
struct SketchAvx2 {
  static void Run(const int8_t* q, uint32_t bits, const uint8_t* c, uint32_t n, int32_t* o,
                  uint32_t s) {
    SketchDotsAvx2T<NQ>(q, bits, c, n, o, s);
  }
};
template <int NQ>
struct SketchAvxVnni {
  static void Run(const int8_t* q, uint32_t bits, const uint8_t* c, uint32_t n, int32_t* o,
                  uint32_t s) {
    SketchDotsAvxVnniT<NQ>(q, bits, c, n, o, s);
  }
};
template <int NQ>
struct SketchAvx512 {
  static void Run(const int8_t* q, uint32_t bits, const uint8_t* c, uint32_t n, int32_t* o,
                  uint32_t s) {
    SketchDotsAvx512T<NQ>(q, bits, c, n, o, s);
  }
};
template <int NQ>
struct SketchAvx512Vnni {
  static void Run(const int8_t* q, uint32_t bits, const uint8_t* c, uint32_t n, int32_t* o,
                  uint32_t s) {
    SketchDotsAvx512VnniT<NQ>(q, bits, c, n, o, s);
  }
};

// ---------------------------------------------------------------- AVX-512 float dots
// The AVX-512 float dots: the scan's, the rescoring's and the tail estimate's kernels. Several
// queries go four rows at a time (DotFourRowsMultiAvx512T); one query four rows at a time
// with single rows at the end (DotFourRowsAvx512T, DotRowMultiAvx512T).
template <ElemType kType>
ICECACHE_AVX512 inline __m512 Load16(const void* row, uint32_t i) {
  if constexpr (kType == ElemType::kF32) {
    return _mm512_loadu_ps(static_cast<const float*>(row) + i);
  } else if constexpr (kType == ElemType::kF16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + i)));
  } else {
    const __m256i raw =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
}

template <ElemType kType, int NQ>
ICECACHE_AVX512 inline void DotRowMultiAvx512T(const float* xs, const void* row, uint32_t dim,
                                               float* out, uint32_t out_stride) {
  __m512 acc[NQ];
  for (int j = 0; j < NQ; ++j) acc[j] = _mm512_setzero_ps();
  uint32_t i = 0;
  for (; i + 16 <= dim; i += 16) {
    const __m512 r = Load16<kType>(row, i);
    for (int j = 0; j < NQ; ++j) {
      acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(xs + uint64_t(j) * dim + i), r, acc[j]);
    }
  }
  for (int j = 0; j < NQ; ++j) {
    float tail = 0;
    for (uint32_t t = i; t < dim; ++t)
      tail += xs[uint64_t(j) * dim + t] * LoadScalar(row, kType, t);
    out[uint64_t(j) * out_stride] = ReduceAddPsAvx512(acc[j]) + tail;
  }
}

// 16 lanes to 8 by adding the halves (AVX-512F alone: no extractf32x8).
ICECACHE_AVX512 inline __m256 FoldAvx512(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

// One query against four rows (the single-query case, a build's parent search and the PCA
// passes): four independent accumulator chains instead of one dependent chain per row, and one
// joint reduction of the four sums. out[k] = x . row_k.
template <ElemType kType>
ICECACHE_AVX512 inline void DotFourRowsAvx512T(const float* x, const void* const* row, uint32_t dim,
                                               float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  uint32_t i = 0;
  for (; i + 16 <= dim; i += 16) {
    const __m512 q = _mm512_loadu_ps(x + i);
    a0 = _mm512_fmadd_ps(q, Load16<kType>(row[0], i), a0);
    a1 = _mm512_fmadd_ps(q, Load16<kType>(row[1], i), a1);
    a2 = _mm512_fmadd_ps(q, Load16<kType>(row[2], i), a2);
    a3 = _mm512_fmadd_ps(q, Load16<kType>(row[3], i), a3);
  }
  FinishFourRows(FoldAvx512(a0), FoldAvx512(a1), FoldAvx512(a2), FoldAvx512(a3), x, row, kType, i,
                 dim, out);
}

// NQ queries (1..4) against four rows: 4 x NQ independent accumulator chains over one load of
// each row chunk, then per query FinishFourRows' joint reduction of the four rows (where the
// one-row kernel reduces every (row, query) pair alone). A row's lanes never mix with another
// row's, so its result depends on the row and the query only, not on the rows beside it.
template <ElemType kType, int NQ>
ICECACHE_AVX512 inline void DotFourRowsMultiAvx512T(const float* xs, const void* const* row,
                                                    uint32_t dim, float* out, uint32_t out_stride) {
  __m512 a[NQ][4];
  for (int j = 0; j < NQ; ++j) a[j][0] = a[j][1] = a[j][2] = a[j][3] = _mm512_setzero_ps();
  uint32_t i = 0;
  for (; i + 16 <= dim; i += 16) {
    const __m512 r0 = Load16<kType>(row[0], i), r1 = Load16<kType>(row[1], i);
    const __m512 r2 = Load16<kType>(row[2], i), r3 = Load16<kType>(row[3], i);
    for (int j = 0; j < NQ; ++j) {
      const __m512 q = _mm512_loadu_ps(xs + uint64_t(j) * dim + i);
      a[j][0] = _mm512_fmadd_ps(q, r0, a[j][0]);
      a[j][1] = _mm512_fmadd_ps(q, r1, a[j][1]);
      a[j][2] = _mm512_fmadd_ps(q, r2, a[j][2]);
      a[j][3] = _mm512_fmadd_ps(q, r3, a[j][3]);
    }
  }
  for (int j = 0; j < NQ; ++j) {
    FinishFourRows(FoldAvx512(a[j][0]), FoldAvx512(a[j][1]), FoldAvx512(a[j][2]),
                   FoldAvx512(a[j][3]), xs + uint64_t(j) * dim, row, kType, i, dim,
                   out + uint64_t(j) * out_stride);
  }
}

// Several queries (2..8) against four rows, in groups of at most four queries (the rows stay in
// L1 between the groups).
template <ElemType kType, int NQ>
ICECACHE_AVX512 inline void DotFourRowsGroupsAvx512T(const float* xs, const void* const* row,
                                                     uint32_t dim, float* out,
                                                     uint32_t out_stride) {
  if constexpr (NQ <= 4) {
    DotFourRowsMultiAvx512T<kType, NQ>(xs, row, dim, out, out_stride);
  } else {
    DotFourRowsMultiAvx512T<kType, 4>(xs, row, dim, out, out_stride);
    DotFourRowsMultiAvx512T<kType, NQ - 4>(xs + uint64_t{4} * dim, row, dim,
                                           out + uint64_t{4} * out_stride, out_stride);
  }
}

template <ElemType kType, int NQ>
ICECACHE_AVX512 void DotRowsMultiAvx512T(const float* xs, const uint8_t* base, uint64_t stride,
                                         const void* const* rows, uint32_t n, uint32_t dim,
                                         float* out, uint32_t out_stride) {
  auto row_at = [&](uint32_t r) -> const void* {
    return rows != nullptr ? rows[r] : base + r * stride;
  };
  auto prefetch_after = [&](uint32_t r) {  // gathered rows: the next block's
    if (rows == nullptr) return;
    for (uint32_t k = r + 4; k < std::min(n, r + 8); ++k) {
      _mm_prefetch(static_cast<const char*>(rows[k]), _MM_HINT_T0);
    }
  };
  if constexpr (NQ > 1) {
    // Blocks of four rows; the last 1-3 rows padded with repeats of the last one (their
    // results dropped), so that every row goes through the same reduction.
    float last[NQ * 4];
    for (uint32_t r = 0; r < n; r += 4) {
      const uint32_t m = std::min<uint32_t>(4, n - r);
      const void* four[4];
      for (uint32_t k = 0; k < 4; ++k) four[k] = row_at(r + std::min(k, m - 1));
      prefetch_after(r);
      if (m == 4) {
        DotFourRowsGroupsAvx512T<kType, NQ>(xs, four, dim, out + r, out_stride);
        continue;
      }
      DotFourRowsGroupsAvx512T<kType, NQ>(xs, four, dim, last, 4);
      for (int j = 0; j < NQ; ++j) {
        for (uint32_t k = 0; k < m; ++k) out[uint64_t(j) * out_stride + r + k] = last[j * 4 + k];
      }
    }
  } else {
    uint32_t r = 0;
    for (; r + 4 <= n; r += 4) {
      const void* four[4] = {row_at(r), row_at(r + 1), row_at(r + 2), row_at(r + 3)};
      prefetch_after(r);
      DotFourRowsAvx512T<kType>(xs, four, dim, out + r);
    }
    for (; r < n; ++r) {
      if (rows != nullptr && r + 2 < n) {
        _mm_prefetch(static_cast<const char*>(rows[r + 2]), _MM_HINT_T0);
      }
      DotRowMultiAvx512T<kType, 1>(xs, row_at(r), dim, out + r, out_stride);
    }
  }
}

template <ElemType kType>
ICECACHE_AVX512 void DotMultiAvx512T(const float* xs, uint32_t nq, const uint8_t* base,
                                     uint64_t stride, const void* const* rows, uint32_t n,
                                     uint32_t dim, float* out, uint32_t out_stride) {
  // Chunks of at most 8 queries, none of 1 when nq > 1 (a lone query would take the
  // single-query kernel, whose reduction differs from the four-row multi-query one's).
  uint32_t m = 0;
  for (uint32_t q0 = 0; q0 < nq; q0 += m) {
    m = std::min<uint32_t>(8, nq - q0);
    if (nq - q0 - m == 1) --m;
    const float* x = xs + uint64_t{q0} * dim;
    float* o = out + uint64_t{q0} * out_stride;
    switch (m) {
#define ICECACHE_NQ_CASE(k)                                                      \
  case k:                                                                        \
    DotRowsMultiAvx512T<kType, k>(x, base, stride, rows, n, dim, o, out_stride); \
    break;
      ICECACHE_NQ_CASE(1)
      ICECACHE_NQ_CASE(2)
      ICECACHE_NQ_CASE(3)
      ICECACHE_NQ_CASE(4)
      ICECACHE_NQ_CASE(5)
      ICECACHE_NQ_CASE(6)
      ICECACHE_NQ_CASE(7)
      ICECACHE_NQ_CASE(8)
#undef ICECACHE_NQ_CASE
    }
  }
}

ICECACHE_AVX512 void DotMultiAvx512(const float* xs, uint32_t nq, const void* base, uint64_t stride,
                                    const void* const* rows, uint32_t n, ElemType type,
                                    uint32_t dim, float* out, uint32_t out_stride) {
  const uint8_t* b = static_cast<const uint8_t*>(base);
  switch (type) {
    case ElemType::kF32:
      return DotMultiAvx512T<ElemType::kF32>(xs, nq, b, stride, rows, n, dim, out, out_stride);
    case ElemType::kF16:
      return DotMultiAvx512T<ElemType::kF16>(xs, nq, b, stride, rows, n, dim, out, out_stride);
    case ElemType::kBF16:
      return DotMultiAvx512T<ElemType::kBF16>(xs, nq, b, stride, rows, n, dim, out, out_stride);
  }
}

// Weighted row sums with 16-lane columns: per query NQ (1..4) and column block, one
// accumulator per 16 columns over the rows in order, as the AVX2 kernel keeps one per 8, so
// every output column sees the same FMAs in the same order and the result equals the AVX2
// kernel's bit for bit. Blocks of 64 columns (4 x NQ accumulators) read each row's 256 bytes
// (fp32) in one pass, where the AVX2 kernel's 16-column blocks pass over the rows dim / 16
// times; then 16-, 8-column blocks and scalar columns.
template <ElemType kType, int NQ>
ICECACHE_AVX512 void WeightedSumAvx512T(const float* weights, uint64_t w_stride,
                                        const uint8_t* base, uint64_t stride, uint32_t n,
                                        uint32_t dim, float* out) {
  uint32_t c = 0;
  for (; c + 64 <= dim; c += 64) {
    __m512 acc[NQ][4];
    for (int j = 0; j < NQ; ++j)
      acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = _mm512_setzero_ps();
    for (uint32_t i = 0; i < n; ++i) {
      const uint8_t* row = base + i * stride;
      const __m512 r0 = Load16<kType>(row, c), r1 = Load16<kType>(row, c + 16);
      const __m512 r2 = Load16<kType>(row, c + 32), r3 = Load16<kType>(row, c + 48);
      for (int j = 0; j < NQ; ++j) {
        const __m512 w = _mm512_set1_ps(weights[j * w_stride + i]);
        acc[j][0] = _mm512_fmadd_ps(w, r0, acc[j][0]);
        acc[j][1] = _mm512_fmadd_ps(w, r1, acc[j][1]);
        acc[j][2] = _mm512_fmadd_ps(w, r2, acc[j][2]);
        acc[j][3] = _mm512_fmadd_ps(w, r3, acc[j][3]);
      }
    }
    for (int j = 0; j < NQ; ++j) {
      float* o = out + uint64_t(j) * dim + c;
      for (int b = 0; b < 4; ++b) {
        _mm512_storeu_ps(o + 16 * b, _mm512_add_ps(_mm512_loadu_ps(o + 16 * b), acc[j][b]));
      }
    }
  }
  for (; c + 16 <= dim; c += 16) {
    __m512 acc[NQ];
    for (int j = 0; j < NQ; ++j) acc[j] = _mm512_setzero_ps();
    for (uint32_t i = 0; i < n; ++i) {
      const __m512 r = Load16<kType>(base + i * stride, c);
      for (int j = 0; j < NQ; ++j) {
        acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(weights[j * w_stride + i]), r, acc[j]);
      }
    }
    for (int j = 0; j < NQ; ++j) {
      float* o = out + uint64_t(j) * dim + c;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[j]));
    }
  }
  for (; c + 8 <= dim; c += 8) {
    __m256 acc[NQ];
    for (int j = 0; j < NQ; ++j) acc[j] = _mm256_setzero_ps();
    for (uint32_t i = 0; i < n; ++i) {
      const __m256 r = Load8(base + i * stride, kType, c);
      for (int j = 0; j < NQ; ++j) {
        acc[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + j * w_stride + i), r, acc[j]);
      }
    }
    for (int j = 0; j < NQ; ++j) {
      float* o = out + uint64_t(j) * dim + c;
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[j]));
    }
  }
  for (; c < dim; ++c) {
    for (int j = 0; j < NQ; ++j) {
      float a = 0;
      for (uint32_t i = 0; i < n; ++i) {
        a += weights[j * w_stride + i] * LoadScalar(base + i * stride, kType, c);
      }
      out[uint64_t(j) * dim + c] += a;
    }
  }
}

template <ElemType kType>
ICECACHE_AVX512 void WeightedSumAvx512Q(const float* weights, uint32_t nq, uint64_t w_stride,
                                        const uint8_t* base, uint64_t stride, uint32_t n,
                                        uint32_t dim, float* out) {
  for (uint32_t q0 = 0; q0 < nq; q0 += 4) {
    const float* w = weights + q0 * w_stride;
    float* o = out + uint64_t{q0} * dim;
    switch (std::min<uint32_t>(4, nq - q0)) {
      case 1:
        WeightedSumAvx512T<kType, 1>(w, w_stride, base, stride, n, dim, o);
        break;
      case 2:
        WeightedSumAvx512T<kType, 2>(w, w_stride, base, stride, n, dim, o);
        break;
      case 3:
        WeightedSumAvx512T<kType, 3>(w, w_stride, base, stride, n, dim, o);
        break;
      default:
        WeightedSumAvx512T<kType, 4>(w, w_stride, base, stride, n, dim, o);
        break;
    }
  }
}

ICECACHE_AVX512 void WeightedSumAvx512(const float* weights, uint32_t nq, uint64_t w_stride,
                                       const void* base, uint64_t stride, uint32_t n, ElemType type,
                                       uint32_t dim, float* out) {
  const uint8_t* b = static_cast<const uint8_t*>(base);
  switch (type) {
    case ElemType::kF32:
      return WeightedSumAvx512Q<ElemType::kF32>(weights, nq, w_stride, b, stride, n, dim, out);
    case ElemType::kF16:
      return WeightedSumAvx512Q<ElemType::kF16>(weights, nq, w_stride, b, stride, n, dim, out);
    case ElemType::kBF16:
      return WeightedSumAvx512Q<ElemType::kBF16>(weights, nq, w_stride, b, stride, n, dim, out);
  }
}

// ---------------------------------------------------------------- detection
// cpuid and xgetbv directly: the feature bits, and the OS's saved state (XCR0) for the
// registers (AVX: XMM+YMM; AVX-512: also opmask and ZMM).
struct CpuFeatures {
  bool avx2 = false, avxvnni = false, avx512 = false, avx512vnni = false;
};

uint64_t ReadXcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t{edx} << 32) | eax;
}

CpuFeatures DetectFeatures() {
  CpuFeatures f;
  uint32_t a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1,
             avx = (c >> 28) & 1;
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = ReadXcr0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1;
  const bool avx512vnni = (c >> 11) & 1;
  uint32_t a1 = 0, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  const bool avxvnni = (a1 >> 4) & 1;
  f.avx2 = ymm_state && avx2 && fma && f16c;
  f.avxvnni = f.avx2 && avxvnni;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512bw;
  f.avx512vnni = f.avx512 && avx512vnni;
  return f;
}

const CpuFeatures& Features() {
  static const CpuFeatures f = DetectFeatures();
  return f;
}

bool Supported(SimdLevel level) {
  const CpuFeatures& f = Features();
  switch (level) {
    case SimdLevel::kScalar:
      return true;
    case SimdLevel::kAvx2:
      return f.avx2;
    case SimdLevel::kAvxVnni:
      return f.avxvnni;
    case SimdLevel::kAvx512:
      return f.avx512;
    case SimdLevel::kAvx512Vnni:
      return f.avx512vnni;
  }
  return false;
}

SimdLevel Best() {
  for (int l = static_cast<int>(SimdLevel::kAvx512Vnni); l > 0; --l) {
    if (Supported(static_cast<SimdLevel>(l))) return static_cast<SimdLevel>(l);
  }
  return SimdLevel::kScalar;
}

std::atomic<SimdLevel> g_level{Best()};

inline SimdLevel Level() { return g_level.load(std::memory_order_relaxed); }
inline bool UseAvx512() { return Level() >= SimdLevel::kAvx512; }
inline bool UseAvx2() { return Level() >= SimdLevel::kAvx2; }

}  // namespace

bool SimdLevelSupported(SimdLevel level) { return Supported(level); }
SimdLevel DetectSimdLevel() { return Best(); }
SimdLevel ActiveSimdLevel() { return Level(); }

SimdLevel SetSimdLevel(SimdLevel level) {
  while (level != SimdLevel::kScalar && !Supported(level)) {
    level = static_cast<SimdLevel>(static_cast<int>(level) - 1);
  }
  g_level.store(level, std::memory_order_relaxed);
  return level;
}

const char* SimdLevelName(SimdLevel level) {
  switch (level) {
    case SimdLevel::kScalar:
      return "scalar";
    case SimdLevel::kAvx2:
      return "avx2+fma+f16c";
    case SimdLevel::kAvxVnni:
      return "avx2+fma+f16c+avx-vnni";
    case SimdLevel::kAvx512:
      return "avx512f+bw";
    case SimdLevel::kAvx512Vnni:
      return "avx512f+bw+vnni";
  }
  return "?";
}

float Dot(const float* x, const void* row, ElemType type, uint32_t dim) {
  if (UseAvx512()) {
    float out;
    DotMultiAvx512(x, 1, row, 0, nullptr, 1, type, dim, &out, 1);
    return out;
  }
  return UseAvx2() ? DotAvx2(x, row, type, dim) : DotScalar(x, row, type, dim);
}

void DotStrided(const float* x, const void* base, uint64_t stride, uint32_t n, ElemType type,
                uint32_t dim, float* out) {
  if (UseAvx512()) return DotMultiAvx512(x, 1, base, stride, nullptr, n, type, dim, out, n);
  if (UseAvx2()) return DotStridedAvx2(x, base, stride, n, type, dim, out);
  const uint8_t* b = static_cast<const uint8_t*>(base);
  for (uint32_t r = 0; r < n; ++r) out[r] = DotScalar(x, b + r * stride, type, dim);
}

void DotGather(const float* x, const void* const* rows, uint32_t n, ElemType type, uint32_t dim,
               float* out) {
  if (UseAvx512()) return DotMultiAvx512(x, 1, nullptr, 0, rows, n, type, dim, out, n);
  if (UseAvx2()) return DotGatherAvx2(x, rows, n, type, dim, out);
  for (uint32_t r = 0; r < n; ++r) out[r] = DotScalar(x, rows[r], type, dim);
}

void DotStridedMulti(const float* xs, uint32_t nq, const void* base, uint64_t stride, uint32_t n,
                     ElemType type, uint32_t dim, float* out, uint32_t out_stride) {
  if (UseAvx512()) {
    return DotMultiAvx512(xs, nq, base, stride, nullptr, n, type, dim, out, out_stride);
  }
  if (UseAvx2()) {
    return DotMultiAvx2(xs, nq, base, stride, nullptr, n, type, dim, out, out_stride);
  }
  const uint8_t* b = static_cast<const uint8_t*>(base);
  for (uint32_t j = 0; j < nq; ++j) {
    for (uint32_t r = 0; r < n; ++r) {
      out[uint64_t{j} * out_stride + r] =
          DotScalar(xs + uint64_t{j} * dim, b + r * stride, type, dim);
    }
  }
}

void WeightedSumStridedMulti(const float* weights, uint32_t nq, uint64_t w_stride, const void* base,
                             uint64_t stride, uint32_t n, ElemType type, uint32_t dim, float* out) {
  if (UseAvx512()) {
    return WeightedSumAvx512(weights, nq, w_stride, base, stride, n, type, dim, out);
  }
  if (UseAvx2()) return WeightedSumAvx2(weights, nq, w_stride, base, stride, n, type, dim, out);
  const uint8_t* b = static_cast<const uint8_t*>(base);
  for (uint32_t j = 0; j < nq; ++j) {
    float* o = out + uint64_t{j} * dim;
    for (uint32_t i = 0; i < n; ++i) {
      const float w = weights[j * w_stride + i];
      for (uint32_t c = 0; c < dim; ++c) o[c] += w * LoadScalar(b + i * stride, type, c);
    }
  }
}

void DotGatherMulti(const float* xs, uint32_t nq, const void* const* rows, uint32_t n,
                    ElemType type, uint32_t dim, float* out, uint32_t out_stride) {
  if (UseAvx512()) {
    return DotMultiAvx512(xs, nq, nullptr, 0, rows, n, type, dim, out, out_stride);
  }
  if (UseAvx2()) {
    return DotMultiAvx2(xs, nq, nullptr, 0, rows, n, type, dim, out, out_stride);
  }
  for (uint32_t j = 0; j < nq; ++j) {
    for (uint32_t r = 0; r < n; ++r) {
      out[uint64_t{j} * out_stride + r] = DotScalar(xs + uint64_t{j} * dim, rows[r], type, dim);
    }
  }
}

void BestLiftedParents(const float* children, uint32_t nc, const float* child_lift,
                       const float* parents_t, const float* parent_lift, uint32_t np,
                       uint32_t np_pad, uint32_t dim, float* best_v, uint32_t* best_j) {
  if (UseAvx2()) {
    return BestLiftedParentsAvx2(children, nc, child_lift, parents_t, parent_lift, np, np_pad, dim,
                                 best_v, best_j);
  }
  for (uint32_t c = 0; c < nc; ++c) {
    const float* x = children + uint64_t{c} * dim;
    for (uint32_t j = 0; j < np; ++j) {
      float v = 0;
      for (uint32_t i = 0; i < dim; ++i) v += x[i] * parents_t[uint64_t{i} * np_pad + j];
      v += child_lift[c] * parent_lift[j];
      if (v > best_v[c]) {
        best_v[c] = v;
        best_j[c] = j;
      }
    }
  }
}

void SketchDots(const int8_t* q8, uint32_t nq, uint32_t bits, const uint8_t* codes, uint32_t n,
                int32_t* out, uint32_t out_stride) {
  switch (Level()) {
    case SimdLevel::kAvx512Vnni:
      return SketchDotsChunked<SketchAvx512Vnni>(q8, nq, bits, codes, n, out, out_stride);
    case SimdLevel::kAvx512:
      return SketchDotsChunked<SketchAvx512>(q8, nq, bits, codes, n, out, out_stride);
    case SimdLevel::kAvxVnni:
      return SketchDotsChunked<SketchAvxVnni>(q8, nq, bits, codes, n, out, out_stride);
    case SimdLevel::kAvx2:
      if (bits > 2048) break;  // the int16 accumulation's range
      return SketchDotsChunked<SketchAvx2>(q8, nq, bits, codes, n, out, out_stride);
    case SimdLevel::kScalar:
      break;
  }
  SketchDotsScalar(q8, nq, bits, codes, n, out, out_stride);
}

void PackSketchCodes(const uint8_t* codes, uint32_t n, uint32_t bits, uint8_t* packed) {
  const uint32_t bytes = bits / 8;
  std::memset(packed, 0, PackedSketchBytes(n, bits));
  for (uint32_t i = 0; i < n; ++i) {
    uint8_t* blk = packed + uint64_t{i / kSketchBlockKeys} * bits * 2 + i % kSketchBlockKeys;
    const uint8_t* c = codes + uint64_t{i} * bytes;
    for (uint32_t p = 0; p < bytes; ++p) blk[p * kSketchBlockKeys] = c[p];
  }
}

void UnpackSketchCodes(const uint8_t* packed, uint32_t n, uint32_t bits, uint8_t* codes) {
  const uint32_t bytes = bits / 8;
  for (uint32_t i = 0; i < n; ++i) {
    const uint8_t* blk = packed + uint64_t{i / kSketchBlockKeys} * bits * 2 + i % kSketchBlockKeys;
    uint8_t* c = codes + uint64_t{i} * bytes;
    for (uint32_t p = 0; p < bytes; ++p) c[p] = blk[p * kSketchBlockKeys];
  }
}

void InsertPackedSketchCode(uint8_t* packed, uint32_t n, uint32_t bits, uint32_t idx,
                            const uint8_t* code) {
  constexpr uint32_t kB = kSketchBlockKeys;
  const uint32_t bytes = bits / 8, first = idx / kB, last = (n - 1) / kB;
  const uint64_t block = uint64_t{bits} * 2;
  // Last block first: a block's lane 15 moves to lane 0 of the next one before that block is
  // itself shifted.
  for (uint32_t b = last + 1; b-- > first;) {
    const uint32_t lo = b == first ? idx % kB : 0;
    for (uint32_t p = 0; p < bytes; ++p) {
      uint8_t* row = packed + b * block + p * kB;
      const uint8_t in = b == first ? code[p] : packed[(b - 1) * block + p * kB + kB - 1];
      std::memmove(row + lo + 1, row + lo, kB - 1 - lo);
      row[lo] = in;
    }
  }
}

void BuildSketchLuts(const int8_t* q8, uint32_t bits, uint8_t* luts, int32_t* bias) {
  int32_t total = 0;
  for (uint32_t g = 0; g < bits / 4; ++g) {
    const int8_t* q = q8 + 4 * g;
    int32_t mn = 0;
    for (int i = 0; i < 4; ++i) mn += std::min<int32_t>(q[i], 0);
    uint8_t* t = luts + SketchLutOffset(g);
    // Entry v is entry (v without its lowest set bit) plus that bit's query value: one add
    // per entry instead of four.
    int32_t sums[16];
    sums[0] = 0;
    for (uint32_t v = 1; v < 16; ++v) sums[v] = sums[v & (v - 1)] + q[__builtin_ctz(v)];
    for (uint32_t v = 0; v < 16; ++v) t[v] = static_cast<uint8_t>(sums[v] - mn);
    total += mn;
  }
  *bias = total;
}

void SketchDotsPacked(const uint8_t* luts, const int32_t* bias, uint32_t nq, uint32_t bits,
                      const uint8_t* packed, uint32_t n, int32_t* out, uint32_t out_stride) {
  if (UseAvx2() && bits <= 1024) {
    const uint64_t lut_stride = uint64_t{bits} * 4;
    for (uint32_t q0 = 0; q0 < nq; q0 += 4) {
      const uint8_t* l = luts + q0 * lut_stride;
      const int32_t* b = bias + q0;
      int32_t* o = out + uint64_t{q0} * out_stride;
      switch (std::min<uint32_t>(4, nq - q0)) {
        case 1:
          SketchDotsPackedAvx2T<1>(l, b, bits, packed, n, o, out_stride);
          break;
        case 2:
          SketchDotsPackedAvx2T<2>(l, b, bits, packed, n, o, out_stride);
          break;
        case 3:
          SketchDotsPackedAvx2T<3>(l, b, bits, packed, n, o, out_stride);
          break;
        default:
          SketchDotsPackedAvx2T<4>(l, b, bits, packed, n, o, out_stride);
          break;
      }
    }
    return;
  }
  SketchDotsPackedScalar(luts, bias, nq, bits, packed, n, out, out_stride);
}

uint32_t SketchCandidatesAbove(const int32_t* dots, const uint16_t* fac, const uint32_t* tok,
                               uint32_t n, float base, float scale, int32_t sum, float floor,
                               uint64_t* out) {
  if (UseAvx512()) {
    return SketchCandidatesAboveAvx512(dots, fac, tok, n, base, scale, sum, floor, out);
  }
  if (UseAvx2()) return SketchCandidatesAboveAvx2(dots, fac, tok, n, base, scale, sum, floor, out);
  uint32_t m = 0;
  for (uint32_t i = 0; i < n; ++i) {
    const float e = base + (HalfToFloat(fac[i]) * scale) * static_cast<float>(2 * dots[i] - sum);
    if (e > floor) out[m++] = RankKey(e, tok[i]);
  }
  return m;
}

void ExpInPlace(float* x, uint32_t n) {
  if (UseAvx2()) return ExpAvx2(x, n);
  for (uint32_t i = 0; i < n; ++i) x[i] = x[i] < -87.f ? 0.f : std::exp(x[i]);
}

float TailLogits(const float* logs, const float* dots, const float* vars, float scale,
                 float half_scale_sq, float cap, uint32_t n, float* out) {
  if (UseAvx2()) return TailLogitsAvx2(logs, dots, vars, scale, half_scale_sq, cap, n, out);
  return TailLogitsScalar(logs, dots, vars, scale, half_scale_sq, cap, 0, n,
                          -std::numeric_limits<float>::infinity(), out);
}

float SquaredNorm(const void* row, ElemType type, uint32_t dim) {
  return UseAvx2() ? SquaredNormAvx2(row, type, dim) : SquaredNormScalar(row, type, dim);
}

void ToFloat(const void* row, ElemType type, uint32_t dim, float* dst) {
  if (UseAvx2()) return ToFloatAvx2(row, type, dim, dst);
  ToFloatScalar(row, type, dim, dst);
}

void SignedFwht(const float* x, const float* signs, uint32_t dim, uint32_t n, float scale,
                float* y) {
  if (UseAvx2() && n >= 8) return SignedFwhtAvx2(x, signs, dim, n, scale, y);
  SignedFwhtScalar(x, signs, dim, n, scale, y);
}

void SignCode(const float* y, uint32_t n, uint8_t* code, float* l1, float* sq) {
  if (UseAvx2()) return SignCodeAvx2(y, n, code, l1, sq);
  SignCodeScalar(y, n, code, l1, sq);
}

}  // namespace icecache::index
