#include "server/index/simd.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

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

template <ElemType kType>
ICECACHE_AVX2 void DotStridedAvx2T(const float* x, const uint8_t* base, uint64_t stride, uint32_t n,
                                   uint32_t dim, float* out) {
  for (uint32_t r = 0; r < n; ++r) out[r] = DotAvx2T<kType>(x, base + r * stride, dim);
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
  for (uint32_t r = 0; r < n; ++r) {
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

bool CpuHasAvx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

std::atomic<SimdLevel> g_level{CpuHasAvx2() ? SimdLevel::kAvx2 : SimdLevel::kScalar};

}  // namespace

SimdLevel DetectSimdLevel() { return CpuHasAvx2() ? SimdLevel::kAvx2 : SimdLevel::kScalar; }
SimdLevel ActiveSimdLevel() { return g_level.load(std::memory_order_relaxed); }

SimdLevel SetSimdLevel(SimdLevel level) {
  if (level == SimdLevel::kAvx2 && !CpuHasAvx2()) level = SimdLevel::kScalar;
  g_level.store(level, std::memory_order_relaxed);
  return level;
}

const char* SimdLevelName(SimdLevel level) {
  return level == SimdLevel::kAvx2 ? "avx2+fma+f16c" : "scalar";
}

float Dot(const float* x, const void* row, ElemType type, uint32_t dim) {
  return ActiveSimdLevel() == SimdLevel::kAvx2 ? DotAvx2(x, row, type, dim)
                                               : DotScalar(x, row, type, dim);
}

void DotStrided(const float* x, const void* base, uint64_t stride, uint32_t n, ElemType type,
                uint32_t dim, float* out) {
  if (ActiveSimdLevel() == SimdLevel::kAvx2)
    return DotStridedAvx2(x, base, stride, n, type, dim, out);
  const uint8_t* b = static_cast<const uint8_t*>(base);
  for (uint32_t r = 0; r < n; ++r) out[r] = DotScalar(x, b + r * stride, type, dim);
}

void DotGather(const float* x, const void* const* rows, uint32_t n, ElemType type, uint32_t dim,
               float* out) {
  if (ActiveSimdLevel() == SimdLevel::kAvx2) return DotGatherAvx2(x, rows, n, type, dim, out);
  for (uint32_t r = 0; r < n; ++r) out[r] = DotScalar(x, rows[r], type, dim);
}

void DotStridedMulti(const float* xs, uint32_t nq, const void* base, uint64_t stride, uint32_t n,
                     ElemType type, uint32_t dim, float* out, uint32_t out_stride) {
  if (ActiveSimdLevel() == SimdLevel::kAvx2) {
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

void DotGatherMulti(const float* xs, uint32_t nq, const void* const* rows, uint32_t n,
                    ElemType type, uint32_t dim, float* out, uint32_t out_stride) {
  if (ActiveSimdLevel() == SimdLevel::kAvx2) {
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
  if (ActiveSimdLevel() == SimdLevel::kAvx2) {
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

void ExpInPlace(float* x, uint32_t n) {
  if (ActiveSimdLevel() == SimdLevel::kAvx2) return ExpAvx2(x, n);
  for (uint32_t i = 0; i < n; ++i) x[i] = x[i] < -87.f ? 0.f : std::exp(x[i]);
}

float SquaredNorm(const void* row, ElemType type, uint32_t dim) {
  return ActiveSimdLevel() == SimdLevel::kAvx2 ? SquaredNormAvx2(row, type, dim)
                                               : SquaredNormScalar(row, type, dim);
}

void ToFloat(const void* row, ElemType type, uint32_t dim, float* dst) {
  if (ActiveSimdLevel() == SimdLevel::kAvx2) return ToFloatAvx2(row, type, dim, dst);
  ToFloatScalar(row, type, dim, dst);
}

}  // namespace icecache::index
