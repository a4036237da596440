// Scoring kernels: dot products of fp32 vectors with key rows stored as fp32, fp16 or bf16,
// converted on the fly. AVX2+FMA+F16C when the CPU has them (chosen once at startup), a
// portable scalar path otherwise; both give the same results within float rounding.
//
// Thread safety: all functions are pure; SetSimdLevel is for tests and benchmarks and must
// not race with scoring.
#pragma once

#include <cstdint>

#include "server/index/rows.h"

namespace icecache::index {

enum class SimdLevel : uint8_t { kScalar = 0, kAvx2 = 1 };

// The best level this CPU supports.
SimdLevel DetectSimdLevel();
// The level in use (DetectSimdLevel() unless overridden).
SimdLevel ActiveSimdLevel();
// Forces a level (clamped to what the CPU supports); returns the level now in use.
SimdLevel SetSimdLevel(SimdLevel level);
const char* SimdLevelName(SimdLevel level);

// x . row over `dim` elements; x is fp32, row of `type`.
float Dot(const float* x, const void* row, ElemType type, uint32_t dim);
// out[i] = x . (base + i * stride) for i in [0, n): rows at a fixed stride (a page).
void DotStrided(const float* x, const void* base, uint64_t stride, uint32_t n, ElemType type,
                uint32_t dim, float* out);
// out[i] = x . rows[i] for i in [0, n): rows anywhere.
void DotGather(const float* x, const void* const* rows, uint32_t n, ElemType type, uint32_t dim,
               float* out);
// |row|^2.
float SquaredNorm(const void* row, ElemType type, uint32_t dim);
// dst[0..dim) = row as fp32.
void ToFloat(const void* row, ElemType type, uint32_t dim, float* dst);

}  // namespace icecache::index
